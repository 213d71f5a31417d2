"""The pre-traffic eval gate, pure part: what to send, how to read the answer, how to score.

Before a canary gets any traffic, a golden prompt set (``spec.rollout.evalGate``: inline
``prompts`` or a ``promptsUri`` JSONL file) is sent to one of its pods (and, with
``maxScoreDrop``, to a stable pod) through the server's OpenAI completions API with temperature
0. Both runtimes call one async function for the I/O, ``kubetune.k8s.scraping.run_eval_gate``
(the operator with pod IPs, the local runtime with its processes' ports); it uses the pieces
here, and the state machine reads the resulting :class:`EvalGateObservation` from
``Observed.eval_gate``.

Scoring: ``kubetune.api.answers.is_correct``, the one rule the trainer's ``evalAccuracy`` uses
too (``exact``: the answer's first line equals the expected text after normalising whitespace,
surrounding punctuation and case; ``contains``: the expected text anywhere in the answer, case
folded). A prompt whose request failed scores 0 -- a canary that cannot answer must not pass by
having fewer prompts counted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kubetune.api.answers import is_correct
from kubetune.api.modeldeployment import EvalGate, GoldenPrompt

#: Where a prompts file is named in the spec (error messages start with it).
PROMPTS_URI_FIELD = "spec.rollout.evalGate.promptsUri"


@dataclass(frozen=True)
class EvalGateObservation:
    """Scores a runtime measured for the current canary (and stable when asked)."""

    revision: str
    canary_score: float | None
    stable_score: float | None = None
    error: str | None = None
    prompts: int = 0


def parse_prompts(text: str, uri: str) -> list[GoldenPrompt]:
    """The golden prompts of a JSONL file: one ``{"prompt": ..., "expected": ...}`` per line.

    Blank lines are skipped. A line that is not such an object raises ValueError naming the
    file and the line (``<uri> line 3: ...``); a file without any prompt is an error too (a gate
    of zero prompts would score 0 and reject every canary for the file's sake).
    """
    prompts: list[GoldenPrompt] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{uri} line {number}: not JSON ({exc})") from None
        if not isinstance(record, dict):
            raise ValueError(
                f"{uri} line {number}: a JSON object "
                f'{{"prompt": ..., "expected": ...}} is needed, not {type(record).__name__}'
            )
        try:
            prompts.append(GoldenPrompt.model_validate(record))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'line'}: {err['msg']}"
                for err in exc.errors()[:3]
            )
            raise ValueError(f"{uri} line {number}: {problems}") from None
    if not prompts:
        raise ValueError(f"{uri}: no golden prompts in the file")
    return prompts


def model_name(md: Mapping[str, Any], gate_model: str | None) -> str:
    """The ``model`` of a golden-prompt request: the canary's served name, else the spec's, else the object's."""
    status = md.get("status") or {}
    return (
        (status.get("canary") or {}).get("modelName")
        or gate_model
        or (md.get("metadata") or {})["name"]
    )


def request_body(prompt: GoldenPrompt, model_name: str, gate: EvalGate) -> dict[str, Any]:
    """The /v1/completions request for one golden prompt (deterministic decoding)."""
    return {
        "model": model_name,
        "prompt": prompt.prompt,
        "max_tokens": gate.max_tokens,
        "temperature": 0,
    }


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The headers of a golden-prompt request: the server's API key as a bearer token, if any."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def answer_of(response: Mapping[str, Any]) -> str | None:
    """The text of a completions response (``choices[0].text``), None when it has none."""
    choices = response.get("choices") or []
    if not choices:
        return None
    text = choices[0].get("text")
    if text is None:
        text = (choices[0].get("message") or {}).get("content")
    return text if isinstance(text, str) else None


def score(prompts: Sequence[GoldenPrompt], answers: Sequence[str | None], match: str) -> float:
    """Share of correct answers (0..1); answers align with prompts, None = request failed."""
    if not prompts:
        return 0.0
    if len(answers) != len(prompts):
        raise ValueError(f"{len(answers)} answers for {len(prompts)} golden prompts")
    correct = sum(is_correct(a, p.expected, match) for p, a in zip(prompts, answers, strict=True))
    return correct / len(prompts)


def verdict(gate: EvalGate, obs: EvalGateObservation) -> str | None:
    """None when the canary passes the gate, else the reason it fails (for status and Events)."""
    if obs.canary_score is None:
        return obs.error or "no eval gate score"
    if obs.canary_score < gate.min_score:
        return f"golden-prompt score {obs.canary_score:.0%} < minScore {gate.min_score:.0%} ({obs.prompts} prompts)"
    if gate.max_score_drop is not None and obs.stable_score is not None:
        drop = obs.stable_score - obs.canary_score
        if drop > gate.max_score_drop + 1e-9:
            return (
                f"golden-prompt score {obs.canary_score:.0%} is {drop:.0%} below stable's "
                f"{obs.stable_score:.0%} (maxScoreDrop {gate.max_score_drop:.0%})"
            )
    return None
