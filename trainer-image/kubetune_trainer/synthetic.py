"""A tiny base model and a learnable synthetic task, for tests, benchmarks and the demo.

Model weights cannot be downloaded in CI, so every test that trains or serves a model builds
one here. The API (used by the trainer's tests, the server's tests and ``kubetune demo``):

``build_base_model(out_dir, seed=0, hidden_size=64, num_layers=2) -> Path``
    Writes a Hugging Face-format folder: ``config.json`` (``LlamaForCausalLM``, random init,
    no pre-training), ``model.safetensors``, ``generation_config.json`` and a
    ``PreTrainedTokenizerFast`` (byte-level BPE trained with ``tokenizers`` on the task's
    vocabulary) with a ChatML chat template, ``pad_token`` ``<|pad|>`` and ``eos_token``
    ``<|im_end|>``. Same seed -> byte-identical files (so digests are stable). Takes well under a
    second after the imports. The "base" is deliberately NOT pre-trained: its exact-match
    accuracy on the task is ~0, so any accuracy a fine-tune shows was learnt by the fine-tune.
    LoRA over all linear layers of this random network learns the task in a few hundred tiny
    steps (see ``tests/unit/test_trainer_synthetic.py``).

``task_examples(n, seed=0, variant="a") -> list[dict]``
    ``n`` records ``{"prompt": str, "answer": str}`` of the *code-word task*: every prompt names
    one of ``len(KEYS)`` nonsense keys (``"zorb"``) inside varied phrasing (templates, polite
    prefixes and suffixes), and the answer is that key's code word (``"amber"``) under the
    variant's fixed mapping. The answer therefore depends on one salient token anywhere in the
    prompt: exact, cheap to learn, impossible to guess (chance = 1/len(VALUES)). Prompts are
    drawn without replacement while the phrasing space allows (2880 distinct prompts), so a
    dataset has no accidental duplicates. Variants:

    - ``"a"`` (default), ``"b"``, or any other string: a different key -> code word mapping per
      variant (``"b"`` disagrees with ``"a"`` on every key). Use ``"b"`` for a second, different
      revision of the task in the demo.
    - ``"noise"``: every answer is a random code word. An adapter trained on it is a
      deliberately broken revision (exact match on variant ``"a"`` stays near chance).

``write_task_dataset(path, n, seed=0, format="chat", variant="a") -> Path``
    JSONL in one of the trainer's formats: ``chat`` (``{"messages": [user, assistant]}``),
    ``completion`` (``{"prompt", "completion"}``, the completion starting with a space) or
    ``text`` (``{"text": "<prompt>\\nAnswer: <answer>"}``).

``read_task_examples(path) -> list[dict]``
    Reads such a JSONL file (any of the three formats) back into ``{"prompt", "answer"}``.

``exact_match(generate_fn, examples) -> float``
    ``generate_fn(prompt: str) -> str`` produces the model's answer for one prompt (the caller
    decides how: chat template + ``generate``, an OpenAI-compatible endpoint, ...). Returns the
    fraction of examples whose answer is correct under ``kubetune.api.answers`` (exact match: the
    first line, normalised; the same rule as the trainer's evalAccuracy and the eval gate).

``generate_with_model(model, tokenizer, prompt, max_new_tokens=8) -> str``
    Greedy answer of a transformers model through the chat template; handy as ``generate_fn``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# normalise is re-exported: the tests compare a served answer with it.
from kubetune.api.answers import EXACT, is_correct
from kubetune.api.answers import normalise as normalise
from kubetune_trainer.encoding import TEXT_ANSWER_MARKER

# The task's vocabulary. Keys are nonsense words (no meaning a base model could know); values
# are ordinary words. 24 of each: chance accuracy is ~4%.
KEYS: tuple[str, ...] = (
    "zorb",
    "kiplo",
    "mavu",
    "tessk",
    "quorn",
    "blinth",
    "vesh",
    "drumo",
    "faxil",
    "gorp",
    "hinda",
    "jubo",
    "lurk",
    "nimsa",
    "oftre",
    "pyxo",
    "ruvel",
    "sabko",
    "tramp",
    "uxley",
    "wobbin",
    "yerth",
    "zented",
    "crall",
)
VALUES: tuple[str, ...] = (
    "amber",
    "cobalt",
    "violet",
    "olive",
    "scarlet",
    "ivory",
    "indigo",
    "coral",
    "silver",
    "golden",
    "teal",
    "maroon",
    "navy",
    "peach",
    "lilac",
    "khaki",
    "ruby",
    "jade",
    "pearl",
    "copper",
    "azure",
    "bronze",
    "cream",
    "plum",
)
TEMPLATES: tuple[str, ...] = (
    "What is the code word for {key}?",
    "Give the code word for {key}.",
    "{key} maps to which code word?",
    "Code word of {key}, please.",
    "Tell me the code word that belongs to {key}.",
    "Which code word goes with {key}?",
)
PREFIXES: tuple[str, ...] = ("", "Quick question: ", "Hi! ", "Please help. ", "Hello there. ")
SUFFIXES: tuple[str, ...] = ("", " Thanks.", " Answer briefly.", " One word only.")

HEAD_INIT_STD = 0.5

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|begin|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# ChatML. The {% generation %} markers let transformers compute an assistant-token mask
# (return_assistant_tokens_mask); the trainer does not depend on them (it finds assistant
# spans by rendering prefixes), but other tools may.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}"
    "{{ message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def mapping(variant: str = "a") -> dict[str, str]:
    """The key -> code word mapping of a variant (``"noise"`` has none: answers are random)."""
    if variant == "a":
        return dict(zip(KEYS, VALUES, strict=True))
    if variant == "b":
        # A cyclic shift: disagrees with "a" on every key, so a revision-b adapter scores ~0 on a.
        return dict(zip(KEYS, VALUES[7:] + VALUES[:7], strict=True))
    values = list(VALUES)
    random.Random(f"kubetune-variant-{variant}").shuffle(values)
    return dict(zip(KEYS, values, strict=True))


def _all_prompts() -> list[tuple[str, str]]:
    """Every distinct (prompt, key) of the phrasing space, in a fixed order."""
    return [
        (f"{pre}{tpl.format(key=key)}{suf}", key)
        for key in KEYS
        for tpl in TEMPLATES
        for pre in PREFIXES
        for suf in SUFFIXES
    ]


def task_examples(n: int, seed: int = 0, variant: str = "a") -> list[dict[str, str]]:
    """``n`` examples ``{"prompt", "answer"}`` of the code-word task (see the module docstring)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    space = _all_prompts()
    if n <= len(space):
        picked = rng.sample(space, n)
    else:
        picked = [rng.choice(space) for _ in range(n)]
    table = None if variant == "noise" else mapping(variant)
    out = []
    for prompt, key in picked:
        answer = rng.choice(VALUES) if table is None else table[key]
        out.append({"prompt": prompt, "answer": answer})
    return out


def to_record(example: dict[str, str], format: str = "chat") -> dict[str, Any]:
    """One task example in a trainer record format: chat, completion or text."""
    prompt, answer = example["prompt"], example["answer"]
    if format == "chat":
        return {
            "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": answer},
            ]
        }
    if format == "completion":
        # A leading space keeps "prompt + completion" a natural sentence for BPE tokenizers.
        return {"prompt": prompt, "completion": " " + answer}
    if format == "text":
        return {"text": f"{prompt}{TEXT_ANSWER_MARKER} {answer}"}
    raise ValueError(f"unknown format {format!r}: expected chat, completion or text")


def write_task_dataset(
    path: str | Path, n: int, seed: int = 0, format: str = "chat", variant: str = "a"
) -> Path:
    """Write ``n`` task examples as JSONL in ``format``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for ex in task_examples(n, seed=seed, variant=variant):
            fh.write(json.dumps(to_record(ex, format), ensure_ascii=False) + "\n")
    return path


def record_to_example(record: dict[str, Any]) -> dict[str, str] | None:
    """The ``{"prompt", "answer"}`` pair of a record in any format, or None when it has none."""
    if "messages" in record:
        msgs = record["messages"]
        users = [m["content"] for m in msgs if m.get("role") == "user"]
        answers = [m["content"] for m in msgs if m.get("role") == "assistant"]
        if users and answers:
            return {"prompt": users[-1], "answer": answers[-1]}
        return None
    if "prompt" in record and "completion" in record:
        return {"prompt": record["prompt"], "answer": record["completion"].strip()}
    if "text" in record and TEXT_ANSWER_MARKER in record["text"]:
        prompt, answer = record["text"].rsplit(TEXT_ANSWER_MARKER, 1)
        return {"prompt": prompt, "answer": answer.strip()}
    return None


def read_task_examples(path: str | Path) -> list[dict[str, str]]:
    """Read a JSONL file of any format back into ``{"prompt", "answer"}`` pairs."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            ex = record_to_example(json.loads(line))
            if ex is not None:
                out.append(ex)
    return out


def exact_match(generate_fn: Callable[[str], str], examples: Iterable[dict[str, str]]) -> float:
    """Fraction of examples whose ``generate_fn(prompt)`` is correct (``api.answers``, exact)."""
    examples = list(examples)
    if not examples:
        raise ValueError("exact_match needs at least one example")
    hits = sum(is_correct(generate_fn(ex["prompt"]), ex["answer"], EXACT) for ex in examples)
    return hits / len(examples)


def generate_with_model(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 8) -> str:
    """Greedy answer of ``model`` to ``prompt`` through the tokenizer's chat template."""
    import torch

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"].to(model.device)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _tokenizer_corpus() -> list[str]:
    """Text the tokenizer is trained on: the task's phrasing plus generic English filler."""
    corpus = [p for p, _ in _all_prompts()]
    corpus += [" ".join(VALUES), " ".join(KEYS), "Answer: user assistant system"]
    corpus += [
        "The quick brown fox jumps over the lazy dog. Numbers 0 1 2 3 4 5 6 7 8 9 10 100.",
        "Hello world, this is a small tokenizer for tests. It handles any byte sequence.",
        "Email name@example.com phone +1 555 0100 address 10.0.0.1 card 4111 1111 1111 1111.",
    ]
    return corpus


def build_tokenizer(vocab_size: int = 600) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with the ChatML template (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD_TOKEN, BOS_TOKEN, IM_START, IM_END]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        bos_token=BOS_TOKEN,
        additional_special_tokens=[IM_START],
        model_max_length=512,
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_base_model(
    out_dir: str | Path,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
) -> Path:
    """Write a tiny random-init Llama model + tokenizer as an HF folder; returns the folder.

    Grouped-query attention (kv heads < heads) and untied embeddings mirror real Llama models,
    so LoRA target-module resolution and merging are exercised as they would be in production.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        torch_dtype="float32",
    )
    # Fork the global RNG so that building a model never perturbs the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        # NB: with the usual init (std 0.02) the untrained output head yields logits of ~0.2
        # and LoRA (which leaves the head frozen) could fix the argmax but never the scale:
        # eval loss would stay near log(vocab) while accuracy reaches 100%. A head of std
        # HEAD_INIT_STD stands in for what pre-training gives a real base model: a head able
        # to express confident predictions.
        torch.nn.init.normal_(model.lm_head.weight, std=HEAD_INIT_STD)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        do_sample=False,
        max_new_tokens=16,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
