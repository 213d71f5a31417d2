"""The eval gate's pure part (kubetune.rollout.evalgate): reading a golden-prompt file.

Aspects covered: a JSONL file of ``{prompt, expected}`` objects becomes the prompts (blank lines
skipped); every kind of bad line is an error naming the file and the line (not JSON, not an
object, a missing field); a file without prompts is an error; the request's model name is the
canary's served name, else the spec's, else the object's.
"""

from __future__ import annotations

import pytest

from kubetune.api.modeldeployment import GoldenPrompt
from kubetune.rollout import evalgate

URI = "s3://bucket/gates/golden.jsonl"


def test_a_jsonl_file_becomes_the_prompts_in_order():
    text = '{"prompt": "Capital of France?", "expected": "Paris"}\n\n{"prompt": "2+2?", "expected": "4"}\n'
    assert evalgate.parse_prompts(text, URI) == [
        GoldenPrompt(prompt="Capital of France?", expected="Paris"),
        GoldenPrompt(prompt="2+2?", expected="4"),
    ]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('{"prompt": "a", "expected": "b"}\n{"prompt": "c", "expected": \n', "line 2: not JSON"),
        ('{"prompt": "a", "expected": "b"}\n\n["a", "b"]\n', "line 3: a JSON object"),
        ('{"prompt": "a"}\n', "line 1: expected: Field required"),
        ('{"prompt": "a", "expected": 4}\n', "line 1: expected: Input should be a valid string"),
        ("\n  \n", "no golden prompts in the file"),
    ],
)
def test_a_bad_prompts_file_is_named_with_its_line(text, needle):
    with pytest.raises(ValueError) as raised:
        evalgate.parse_prompts(text, URI)
    assert str(raised.value).startswith(URI) and needle in str(raised.value)


@pytest.mark.parametrize(
    ("status", "spec_name", "expected"),
    [
        ({"canary": {"name": "abc", "modelName": "served"}}, "chat-model", "served"),
        ({"canary": {"name": "abc"}}, "chat-model", "chat-model"),
        ({}, None, "chat"),
    ],
)
def test_the_request_names_the_canary_served_model(status, spec_name, expected):
    md = {"metadata": {"name": "chat"}, "status": status}
    assert evalgate.model_name(md, spec_name) == expected
