"""Dataset checks and cleaning of the trainer (kubetune_trainer.data / encoding / batching).

Covers: every bad line reported as file:line with its reason (bad JSON, missing fields, wrong
roles, empty answers, an empty user turn), examples of every kind of error kept and shown grouped
by kind (bad JSON never hides schema errors), blank lines counted and reported as a warning,
format auto-detection, PII masking per kind (with Luhn-checked card
numbers and digit-count-checked phone numbers, so ordinary numbers survive), user regexes,
exact and normalised dedupe, the content-hash split (stable, disjoint, never empty), the leakage
check, labels only on assistant/completion tokens, and the deterministic batch order and packing.
"""

from __future__ import annotations

import json

import pytest

from kubetune_trainer import data
from kubetune_trainer.batching import BatchPlan, collate, make_rows, real_tokens
from kubetune_trainer.encoding import IGNORE, encode_record
from kubetune_trainer.errors import ConfigError, DataError


def jsonl(*rows) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode() + b"\n"


CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "invalid JSON"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role must be one of"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content must be a string"),
        ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message"),
        ({"text": "t"}, "missing field 'messages'"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_a_bad_chat_line_is_reported_with_file_line_and_reason(line, reason):
    parsed = data.parse_jsonl(jsonl(CHAT, "", CHAT, line), "s3://b/train.jsonl", "chat")
    assert parsed.invalid == 1 and len(parsed.records) == 2
    (err,) = parsed.errors
    assert err.file == "s3://b/train.jsonl" and err.line == 4  # blank line 2 still counts as a line
    assert reason in err.reason
    assert str(err).startswith("s3://b/train.jsonl:4: ")


@pytest.mark.parametrize(
    ("fmt", "good", "bad", "reason"),
    [
        (
            "completion",
            {"prompt": "p", "completion": "c"},
            {"prompt": "p"},
            "missing field 'completion'",
        ),
        (
            "completion",
            {"prompt": "p", "completion": "c"},
            {"prompt": "p", "completion": " "},
            "'completion' is empty",
        ),
        ("text", {"text": "t"}, {"text": ""}, "'text' must be a non-empty string"),
    ],
)
def test_completion_and_text_lines_are_checked(fmt, good, bad, reason):
    parsed = data.parse_jsonl(jsonl(good, bad), "f.jsonl", fmt)
    assert [e.line for e in parsed.errors] == [2] and reason in parsed.errors[0].reason


@pytest.mark.parametrize(
    ("first", "fmt"),
    [(CHAT, "chat"), ({"prompt": "a", "completion": "b"}, "completion"), ({"text": "a"}, "text")],
)
def test_auto_detects_the_format_from_the_first_record(first, fmt):
    assert data.parse_jsonl(jsonl("garbage", first), "f", "auto").format == fmt


def test_auto_detection_fails_with_a_message_that_says_what_to_fix():
    with pytest.raises(DataError, match="cannot detect the record format.*dataset.format"):
        data.parse_jsonl(jsonl({"question": "a"}), "f.jsonl", "auto")


def test_errors_are_capped_but_all_counted():
    parsed = data.parse_jsonl(jsonl(*["nope"] * 120, CHAT), "f", "chat")
    assert parsed.invalid == 120 and len(parsed.errors) == data.MAX_REPORTED_ERRORS
    assert [e.line for e in parsed.errors] == list(range(1, data.MAX_REPORTED_ERRORS + 1))


def test_every_kind_of_error_keeps_examples_even_behind_many_json_errors():
    rows = [*["nope"] * 120, {"text": "wrong schema"}, CHAT, {"prompt": "p", "completion": "c"}]
    rows.append(
        {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]}
    )
    parsed = data.parse_jsonl(jsonl(*rows), "f", "chat")
    assert parsed.invalid == 123
    assert parsed.invalid_by_kind == {
        data.INVALID_JSON: 120,
        data.WRONG_SCHEMA: 2,
        data.EMPTY_CONTENT: 1,
    }
    by_kind = parsed.errors_by_kind()
    assert by_kind[data.WRONG_SCHEMA]["count"] == 2
    assert [e["line"] for e in by_kind[data.WRONG_SCHEMA]["examples"]] == [121, 123]
    assert by_kind[data.EMPTY_CONTENT]["examples"][0]["reason"].startswith(
        "messages[0]: user turn with empty content"
    )
    assert len(by_kind[data.INVALID_JSON]["examples"]) == data.MAX_REPORTED_ERRORS


def test_the_failure_message_shows_examples_of_every_kind_grouped():
    from kubetune_trainer.validate import describe_errors

    rows = [*["nope"] * 8, {"text": "wrong schema"}, CHAT]
    message = describe_errors(data.parse_jsonl(jsonl(*rows), "f", "chat"))
    json_part, schema_part = message.split(" | ")
    assert json_part.startswith("invalid JSON (8 lines): f:1: invalid JSON")
    assert json_part.endswith("(and 3 more)")
    assert schema_part.startswith("wrong record schema (1 line): f:9: missing field 'messages'")


def test_blank_lines_are_counted_and_reported_as_a_warning_not_as_lines():
    parsed = data.parse_jsonl(jsonl(CHAT, "", CHAT, "   ", CHAT), "f", "chat")
    assert parsed.total_lines == 3 and parsed.invalid == 0 and len(parsed.records) == 3
    assert parsed.blank == 2 and parsed.blank_lines == [2, 4]
    assert parsed.warnings() == ["f: 2 blank line(s) skipped (line 2, 4)"]
    # The newline that ends the last line is no blank line.
    assert data.parse_jsonl(jsonl(CHAT), "f", "chat").blank == 0


def test_a_user_turn_with_empty_content_is_an_invalid_line():
    empty_user = {
        "messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "hi"}]
    }
    assert data.check_record(empty_user, "chat") == (
        "messages[0]: user turn with empty content (nothing to answer)"
    )
    assert data.check_record(CHAT, "chat") is None


def test_non_utf8_is_a_data_error():
    with pytest.raises(DataError, match="not UTF-8"):
        data.parse_jsonl(b"\xff\xfe{}", "f.jsonl")


@pytest.mark.parametrize(
    ("kind", "text", "masked"),
    [
        ("email", "mail jane.doe+x@mail.example.org now", "mail [EMAIL] now"),
        ("phone", "call +1 (555) 010-0199 today", "call [PHONE] today"),
        ("phone", "call 030 1234567", "call [PHONE]"),
        ("creditCard", "card 4111 1111 1111 1111 ok", "card [CREDIT_CARD] ok"),
        ("creditCard", "card 4111-1111-1111-1112 ok", "card 4111-1111-1111-1112 ok"),  # fails Luhn
        ("idCard", "ssn 123-45-6789.", "ssn [ID_CARD]."),
        ("idCard", "id 11010519491231002X", "id [ID_CARD]"),
        (
            "ipAddress",
            "from 10.0.0.1 and 2001:0db8:85a3:0000:0000:8a2e:0370:7334",
            "from [IP_ADDRESS] and [IP_ADDRESS]",
        ),
        ("ipAddress", "version 1.2.3 and 999.1.1.1", "version 1.2.3 and 999.1.1.1"),
        ("phone", "in 2024 we sold 12 units", "in 2024 we sold 12 units"),
    ],
)
def test_pii_kinds_are_masked_and_counted(kind, text, masked):
    masker = data.PiiMasker([kind])
    assert masker.mask_text(text) == masked
    assert masker.counts[kind] == masked.count("[")


def test_pii_masking_touches_every_string_but_not_roles_and_counts_custom_kinds():
    masker = data.PiiMasker(["email"], [("employee", r"EMP-\d{4}")])
    record = {
        "messages": [
            {"role": "user", "content": "EMP-1234 is a@b.io"},
            {"role": "assistant", "content": "ok EMP-9999"},
        ]
    }
    out = masker.mask_record(record)
    assert out["messages"][0] == {"role": "user", "content": "[EMPLOYEE] is [EMAIL]"}
    assert out["messages"][1]["content"] == "ok [EMPLOYEE]"
    assert masker.counts == {"email": 1, "employee": 2}


@pytest.mark.parametrize("regex", ["(unclosed", "x*"])
def test_a_bad_custom_regex_is_a_config_error_naming_the_field(regex):
    with pytest.raises(ConfigError, match=r"dataset\.piiMasking\.custom\[0\]\.regex"):
        data.PiiMasker([], [("x", regex)])


def test_dedupe_drops_exact_and_normalised_duplicates_keeping_the_first():
    a = {"text": "Hello  World"}
    recs = [a, dict(a), {"text": "hello world"}, {"text": "other"}]
    kept, exact, norm = data.dedupe(recs)
    assert kept == [a, {"text": "other"}] and (exact, norm) == (1, 1)


def test_hash_split_is_stable_disjoint_and_independent_of_order():
    recs = [{"text": f"example {i}"} for i in range(400)]
    train, val = data.split_by_hash(recs, 0.2)
    train2, val2 = data.split_by_hash(list(reversed(recs)), 0.2)
    assert sorted(map(json.dumps, val)) == sorted(map(json.dumps, val2))
    assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in val}
    assert len(train) + len(val) == 400 and 40 <= len(val) <= 120
    assert data.split_by_hash(recs[:3], 0.01)[1]  # never empty with a positive fraction


def test_leakage_check_removes_train_records_present_in_validation():
    train = [{"text": "A b"}, {"text": "c"}]
    kept, leaked = data.remove_leaks(train, [{"text": "a  B"}])
    assert kept == [{"text": "c"}] and leaked == 1


def test_chat_labels_cover_only_the_assistant_answer(tiny_base_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base_model)
    rec = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "Code word of zorb?"},
            {"role": "assistant", "content": "amber"},
        ]
    }
    enc = encode_record(tok, rec, "chat", 512)
    target = [t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE]
    assert tok.decode(target).startswith("amber<|im_end|>")
    assert "zorb" not in tok.decode(target) and "assistant" not in tok.decode(target)
    prompt = tok.apply_chat_template(
        rec["messages"][:2], add_generation_prompt=True, tokenize=False
    )
    assert tok.decode(enc.input_ids).startswith(prompt)
    short = encode_record(tok, rec, "chat", 5)
    assert short.truncated and len(short.input_ids) == 5 and short.full_length == len(enc.input_ids)


def test_completion_labels_cover_completion_and_eos(tiny_base_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base_model)
    enc = encode_record(tok, {"prompt": "Q: zorb?", "completion": " amber"}, "completion", 512)
    target = [t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE]
    assert tok.decode(target) == " amber" + tok.eos_token


def test_batch_order_is_a_pure_function_of_seed_and_index():
    plan, again = BatchPlan(10, 4, seed=7), BatchPlan(10, 4, seed=7)
    epoch0 = [i for k in range(plan.batches_per_epoch) for i in plan.indices(k)]
    assert sorted(epoch0) == list(range(10))
    assert [again.indices(k) for k in (5, 0, 3)] == [plan.indices(k) for k in (5, 0, 3)]
    assert plan.indices(0) != plan.indices(plan.batches_per_epoch) or plan.indices(
        1
    ) != plan.indices(4)
    assert BatchPlan(10, 4, seed=8).permutation(0) != plan.permutation(0)


def test_packing_fills_rows_restarts_positions_and_hides_the_boundary_label():
    from kubetune_trainer.encoding import Encoded

    exs = [Encoded([i] * 3, [i] * 3, 3) for i in range(1, 6)]
    rows = make_rows(exs, max_len=7, packing=True, seed=0)
    assert [len(r.input_ids) for r in rows] == [6, 6, 3]
    first = rows[0]
    assert first.position_ids == [0, 1, 2, 0, 1, 2]
    assert first.labels[3] == IGNORE and first.labels[0] != IGNORE
    batch = collate(rows, pad_id=0)
    assert batch["input_ids"].shape == (3, 6) and real_tokens(batch) == 15
    assert batch["attention_mask"].shape == (3, 1, 6, 6)  # block-diagonal (test_trainer_packing.py)
    assert (batch["labels"][2, 3:] == IGNORE).all()
