"""The pre-traffic eval gate, pure part: what to send, how to read the answer, how to score.

Before a canary gets any traffic, a golden prompt set (``spec.rollout.evalGate``) is sent to
one of its pods (and, with ``maxScoreDrop``, to a stable pod) through the server's OpenAI
completions API with temperature 0. A runtime (operator: k8s/scraping.py against pod IPs; local
runtime: its processes' ports) does the HTTP and passes the answers here; the state machine
reads the resulting :class:`EvalGateObservation` from ``Observed.eval_gate``.

Scoring: ``exact`` compares stripped, case-folded strings; ``contains`` asks for the expected
text anywhere in the answer (case-folded). A prompt whose request failed scores 0 -- a canary
that cannot answer must not pass by having fewer prompts counted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubetune.api.modeldeployment import EvalGate, GoldenPrompt


@dataclass(frozen=True)
class EvalGateObservation:
    """Scores a runtime measured for the current canary (and stable when asked)."""

    revision: str
    canary_score: float | None
    stable_score: float | None = None
    error: str | None = None
    prompts: int = 0


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


def is_correct(answer: str | None, expected: str, match: str) -> bool:
    """Whether one answer counts as correct under ``match`` (exact or contains)."""
    if answer is None:
        return False
    got, want = answer.strip().casefold(), expected.strip().casefold()
    return got == want if match == "exact" else want in got


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
