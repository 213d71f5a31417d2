"""Packing without cross-contamination (kubetune_trainer.batching.collate).

Covers: the loss of a packed micro-batch equals the summed losses of the same examples run one by
one, to float tolerance, through both routes the trainer uses -- SDPA with the block-diagonal
4-D mask (CPU, and GPUs without flash-attn) and the flattened variable-length form that
flash-attention's kernel reads from position_ids (run here through transformers' SDPA packed path,
which derives the same sequence boundaries); the gradients agree too; the old plain padding mask
lets examples attend to each other (the test can fail); the mask's shape, padding rows and token
count; the trainer picks sdpa on CPU.
"""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from kubetune_trainer.batching import (  # noqa: E402
    BLOCK,
    VARLEN,
    Row,
    block_causal_mask,
    collate,
    make_rows,
    real_tokens,
    segments,
)
from kubetune_trainer.encoding import IGNORE, Encoded  # noqa: E402

VOCAB = 97


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).double()  # float64 weights (the loss itself is fp32 in transformers)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:  # larger weights than the usual init: attention that matters
                p.normal_(0.0, 0.3)
    m.eval()  # no dropout in Llama anyway; eval keeps the test about attention only
    return m


def examples(n: int, seed: int = 1) -> list[Encoded]:
    """Examples of 5..40 tokens whose first few tokens are a prompt (labels IGNORE)."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        length = rnd.randint(5, 40)
        ids = [rnd.randrange(1, VOCAB) for _ in range(length)]
        prompt = rnd.randint(1, length - 2)
        out.append(Encoded(ids, [IGNORE] * prompt + ids[prompt:], length))
    return out


def loss_sum(model, batch) -> torch.Tensor:
    """Summed next-token loss over the batch's targets."""
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    out = model(**batch, use_cache=False, num_items_in_batch=torch.tensor(n))
    return out.loss * n


def one_by_one(model, exs: list[Encoded]) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for e in exs:
        batch = collate([Row(e.input_ids, e.labels, list(range(len(e.input_ids))))], 0)
        total = total + loss_sum(model, batch)
    return total


@pytest.mark.parametrize("route", [BLOCK, VARLEN])
def test_packed_loss_equals_the_examples_run_one_by_one(model, route):
    exs = examples(24)
    rows = make_rows(exs, 96, packing=True, seed=3)
    assert len(rows) < len(exs) and any(len(segments(r.position_ids)) > 1 for r in rows)
    packed = sum(
        loss_sum(model, collate(rows[i : i + 4], 0, route)) for i in range(0, len(rows), 4)
    )
    with torch.no_grad():
        assert float(packed) == pytest.approx(float(one_by_one(model, exs)), rel=1e-6)


def test_packed_gradients_equal_the_examples_run_one_by_one(model):
    exs = examples(10, seed=7)
    rows = make_rows(exs, 128, packing=True, seed=0)
    model.zero_grad()
    loss_sum(model, collate(rows, 0, BLOCK)).backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    one_by_one(model, exs).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed[n], p.grad, rtol=1e-5, atol=1e-8, msg=n)
    model.zero_grad()


def test_a_plain_padding_mask_lets_packed_examples_attend_to_each_other(model):
    # What the trainer did before: position ids restarted, the attention mask all ones.
    exs = examples(24)
    rows = make_rows(exs, 96, packing=True, seed=3)
    batch = collate(rows, 0, BLOCK)
    batch["attention_mask"] = (batch["input_ids"] != -1).long()
    for i, r in enumerate(rows):
        batch["attention_mask"][i, len(r.input_ids) :] = 0
    with torch.no_grad():
        leaky = float(loss_sum(model, batch))
        assert abs(leaky - float(one_by_one(model, exs))) > 1e-2 * abs(leaky)


def test_block_mask_is_causal_within_each_example_and_padding_sees_only_the_first_token():
    rows = [Row([1, 2, 3, 4, 5], [1] * 5, [0, 1, 0, 1, 2]), Row([6, 7], [1] * 2, [0, 1])]
    mask = block_causal_mask(rows, 5)
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]
    assert mask[1, 0, 2:].int().tolist() == [[1, 0, 0, 0, 0]] * 3  # padding
    batch = collate(rows, 0, BLOCK)
    assert real_tokens(batch) == 7 and batch["position_ids"][0].tolist() == [0, 1, 0, 1, 2]


def test_unpacked_rows_keep_the_plain_padding_mask():
    rows = [Row([1, 2, 3], [1] * 3, [0, 1, 2]), Row([4], [1], [0])]
    batch = collate(rows, 0, BLOCK)
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]] and real_tokens(batch) == 4


def test_varlen_flattens_without_padding_and_masks_each_rows_first_label():
    rows = [Row([1, 2, 3], [1, 2, 3], [0, 0, 1]), Row([4, 5], [4, 5], [0, 1])]
    batch = collate(rows, 0, VARLEN)
    assert "attention_mask" not in batch and real_tokens(batch) == 5
    assert batch["position_ids"].tolist() == [[0, 0, 1, 0, 1]]
    assert batch["labels"].tolist() == [[1, 2, 3, IGNORE, 5]]


def test_the_trainer_uses_sdpa_with_block_masks_on_cpu():
    from kubetune_trainer.train import attention_for

    assert attention_for(torch.device("cpu"), torch.bfloat16) == "sdpa"
