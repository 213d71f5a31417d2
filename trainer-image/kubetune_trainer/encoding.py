"""Records -> token ids and labels (loss on what the model should learn to produce).

- chat: the tokenizer's chat template renders the conversation; only assistant turns carry
  labels. The rendering is split into per-message segments by rendering growing prefixes
  (``render(messages[:i+1])`` minus ``render(messages[:i])``), and an assistant segment is split
  again after its header (``add_generation_prompt``), so the header is context and the content
  plus end-of-turn token is the target -- exactly what the model sees at generation time.
- completion: the prompt is context, the completion plus EOS the target.
- text: every token is a target (EOS appended).

Sequences longer than ``max_len`` are truncated (the validator counts them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE = -100
# What follows a prompt in the "text" format before its answer (the synthetic data writes it).
TEXT_ANSWER_MARKER = "\nAnswer:"


@dataclass
class Encoded:
    """One tokenised example."""

    input_ids: list[int]
    labels: list[int]
    full_length: int  # before truncation

    @property
    def truncated(self) -> bool:
        """Whether the example was cut at max_len."""
        return self.full_length > len(self.input_ids)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool = False) -> str:
    if not messages and not generation_prompt:
        return ""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def chat_segments(tokenizer: Any, messages: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    """``[(text, is_target), ...]`` whose concatenation is the rendered conversation."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, msg in enumerate(messages):
        full = _render(tokenizer, messages[: i + 1])
        if not full.startswith(done):
            # A template that rewrites earlier turns (e.g. drops reasoning of old turns): fall
            # back to training on the whole rendering rather than guessing the spans.
            return [(_render(tokenizer, messages), True)]
        if msg["role"] == "assistant":
            header = _render(tokenizer, messages[:i], generation_prompt=True)
            if header.startswith(done) and full.startswith(header):
                segments.append((header[len(done) :], False))
                segments.append((full[len(header) :], True))
            else:
                segments.append((full[len(done) :], True))
        else:
            segments.append((full[len(done) :], False))
        done = full
    return segments


def encode_record(tokenizer: Any, record: dict[str, Any], fmt: str, max_len: int) -> Encoded:
    """Token ids and labels of one record (see the module docstring)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt == "chat":
        segments = chat_segments(tokenizer, record["messages"])
        ids: list[int] = []
        labels: list[int] = []
        for text, target in segments:
            part = _ids(tokenizer, text)
            ids += part
            labels += part if target else [IGNORE] * len(part)
    elif fmt == "completion":
        prompt = _ids(tokenizer, record["prompt"])
        completion = _ids(tokenizer, record["completion"]) + eos
        ids = prompt + completion
        labels = [IGNORE] * len(prompt) + completion
    elif fmt == "text":
        ids = _ids(tokenizer, record["text"]) + eos
        labels = list(ids)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    bos = getattr(tokenizer, "bos_token_id", None)
    if (
        bos is not None
        and getattr(tokenizer, "add_bos_token", False)
        and (not ids or ids[0] != bos)
    ):
        ids, labels = [bos] + ids, [IGNORE] + labels
    full = len(ids)
    return Encoded(ids[:max_len], labels[:max_len], full)


def prompt_ids(tokenizer: Any, prompt: str, fmt: str) -> list[int]:
    """The ids a model continues from to answer ``prompt`` in the dataset's format."""
    if fmt == "chat":
        text = _render(tokenizer, [{"role": "user", "content": prompt}], generation_prompt=True)
    elif fmt == "text":
        text = prompt + TEXT_ANSWER_MARKER
    else:
        text = prompt
    return _ids(tokenizer, text)
