"""When an answer counts as correct: ``spec.rollout.evalGate.match`` and the trainer's accuracy.

One definition for every place that scores a model's answer against an expected one: the eval
gate of a ModelDeployment (both runtimes, ``rollout.evalgate``), the ``evalAccuracy`` metric a
FineTuneJob's trainer reports, and the generated traffic of ``kubetune demo`` /
``kubetune local traffic``. So a model trained to an ``evalAccuracy`` of 0.9 is judged by the
gate with the same rule that produced that figure.

``exact`` compares normalised answers, the usual exact-match of QA evaluation (SQuAD's EM):
only the first line counts (a completion of ``max_tokens`` often runs on past the answer),
whitespace runs are one space, surrounding punctuation and quotes go, and case is folded.
``contains`` asks for the expected text anywhere in the whole answer, case folded.
"""

from __future__ import annotations

import re

EXACT = "exact"
CONTAINS = "contains"
# Stripped from both ends of a normalised answer: "Paris." and "'Paris'" are "paris".
_SURROUNDING = " .,!?;:\"'"


def normalise(text: str) -> str:
    """An answer as exact match compares it: first line, one space per run, no punctuation around, case folded."""
    text = text.strip()
    first = text.splitlines()[0] if text else ""
    return re.sub(r"\s+", " ", first).strip(_SURROUNDING).casefold()


def is_correct(answer: str | None, expected: str, match: str = EXACT) -> bool:
    """Whether ``answer`` counts as ``expected`` under ``match``; None (no answer) never does."""
    if answer is None:
        return False
    if match == EXACT:
        return normalise(answer) == normalise(expected)
    return expected.strip().casefold() in answer.strip().casefold()
