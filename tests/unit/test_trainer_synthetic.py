"""The synthetic base model and task used by every training and serving test.

Covers: the model folder loads with transformers and is byte-identical for the same seed; the
tokenizer round-trips text and renders the ChatML template; datasets in all three formats read
back to the same examples; variants a and b disagree on every key; exact_match scores an oracle
1.0 and the untrained base ~0; LoRA over the random base learns the task (the property the
trainer tests rely on).
"""

from __future__ import annotations

import json

import pytest

from kubetune_trainer import synthetic


def test_same_seed_gives_byte_identical_model_folder(tmp_path, tiny_base_model):
    again = synthetic.build_base_model(tmp_path / "again", seed=0)
    names = sorted(p.name for p in tiny_base_model.iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names and "config.json" in names
    for name in names:
        assert (again / name).read_bytes() == (tiny_base_model / name).read_bytes(), name


def test_tokenizer_round_trips_and_renders_chat_template(tiny_base_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base_model)
    text = "Grüße, zorb -> amber! 123 name@example.com"
    assert tok.decode(tok(text)["input_ids"]) == text
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "amber"}],
        tokenize=False,
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\namber<|im_end|>\n"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"


@pytest.mark.parametrize("fmt", ["chat", "completion", "text"])
def test_dataset_formats_read_back_to_the_same_examples(tmp_path, fmt):
    path = synthetic.write_task_dataset(tmp_path / "d.jsonl", n=30, seed=3, format=fmt)
    first = json.loads(path.read_text().splitlines()[0])
    assert (
        set(first)
        == {"chat": {"messages"}, "completion": {"prompt", "completion"}, "text": {"text"}}[fmt]
    )
    assert synthetic.read_task_examples(path) == synthetic.task_examples(30, seed=3)


def test_examples_are_distinct_and_variants_disagree():
    exs = synthetic.task_examples(500, seed=1)
    assert len({e["prompt"] for e in exs}) == 500
    a, b = synthetic.mapping("a"), synthetic.mapping("b")
    assert all(a[k] != b[k] for k in synthetic.KEYS)
    noise = synthetic.task_examples(200, seed=1, variant="noise")
    agree = sum(n["answer"] == e["answer"] for n, e in zip(noise, exs[:200], strict=True))
    assert agree < 40  # chance is 1/24


def test_exact_match_scores_oracle_and_normalises():
    exs = synthetic.task_examples(20, seed=5)
    table = synthetic.mapping("a")

    def oracle(prompt: str) -> str:
        key = next(
            k
            for k in synthetic.KEYS
            if k in prompt.split() or f"{k}?" in prompt or f"{k}." in prompt or f"{k}," in prompt
        )
        return f"  {table[key].upper()}.\nextra"

    assert synthetic.exact_match(oracle, exs) == 1.0
    assert synthetic.exact_match(lambda p: "nothing", exs) == 0.0
    with pytest.raises(ValueError):
        synthetic.exact_match(oracle, [])


@pytest.mark.slow
def test_lora_learns_the_task_from_the_random_base(tiny_base_model, task_eval_examples):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_base_model)
    gen = lambda m: lambda p: synthetic.generate_with_model(m, tok, p)  # noqa: E731
    base_acc = synthetic.exact_match(gen(model), task_eval_examples)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    data = []
    for ex in synthetic.task_examples(400, seed=1):
        user = [{"role": "user", "content": ex["prompt"]}]
        pre = tok.apply_chat_template(user, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
        full = tok.apply_chat_template(
            user + [{"role": "assistant", "content": ex["answer"]}], return_dict=True
        )["input_ids"]
        data.append((full, [-100] * len(pre) + full[len(pre) :]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(160):
        batch = [data[(step * 16 + i) % len(data)] for i in range(16)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        loss = model(
            input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels
        ).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    tuned_acc = synthetic.exact_match(gen(model), task_eval_examples)
    assert base_acc <= 0.1
    assert tuned_acc >= 0.8
