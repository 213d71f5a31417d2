"""When an answer counts as correct (kubetune.api.answers), and that every scorer uses that rule.

Covers:
- ``normalise``: first line only, whitespace runs, surrounding punctuation and quotes, case;
- ``is_correct`` under ``exact`` and ``contains``; no answer (a failed request) is never correct;
- one rule: the eval gate's ``evalgate.score`` (both runtimes) and the test fixtures'
  ``synthetic.exact_match`` give the same verdict on the same answers (the trainer's
  evalAccuracy and the demo's traffic call ``is_correct`` themselves). They once differed: the
  gate compared whole stripped strings, so ``"Zebra."`` or an answer followed by more lines
  failed the gate while counting as correct in ``evalAccuracy``.
"""

from __future__ import annotations

import pytest

from kubetune.api.answers import CONTAINS, EXACT, is_correct, normalise
from kubetune.api.modeldeployment import GoldenPrompt
from kubetune.rollout import evalgate
from kubetune_trainer import synthetic


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Zebra", "zebra"),
        ("  Zebra.  ", "zebra"),
        ("'Zebra!'", "zebra"),
        ("Zebra\nQuestion: what next?", "zebra"),
        ("\n\nZebra\nmore", "zebra"),
        ("two   words\there", "two words here"),
        ("STRASSE", "strasse"),
        ("Straße", "strasse"),  # case folded, not just lower-cased
        ("", ""),
        ("   \n  ", ""),
    ],
)
def test_normalise(text, expected):
    assert normalise(text) == expected


@pytest.mark.parametrize(
    ("answer", "expected", "match", "correct"),
    [
        ("Zebra.", "zebra", EXACT, True),
        ("Zebra\nand then some", "zebra", EXACT, True),
        ("The code word is Zebra.", "zebra", EXACT, False),
        ("The code word is Zebra.", "zebra", CONTAINS, True),
        ("first line\nZebra", "zebra", CONTAINS, True),  # contains reads the whole answer
        ("first line\nZebra", "zebra", EXACT, False),
        (" 4 ", "4", EXACT, True),
        ("44", "4", EXACT, False),
        (None, "4", EXACT, False),
        (None, "4", CONTAINS, False),
    ],
)
def test_is_correct(answer, expected, match, correct):
    assert is_correct(answer, expected, match) is correct


ANSWERS = ["Zebra.", "zebra\nQuestion: next", "The code word is Zebra.", " ZEBRA ", "zebras"]


def test_the_eval_gate_and_the_trainer_metric_agree_on_exact_match():
    gate = [
        evalgate.score([GoldenPrompt(prompt="p", expected="zebra")], [a], EXACT) for a in ANSWERS
    ]
    fixture = [
        synthetic.exact_match(lambda _p, a=a: a, [{"prompt": "p", "answer": "zebra"}])
        for a in ANSWERS
    ]
    assert gate == fixture == [1.0, 1.0, 0.0, 1.0, 0.0]
