"""Dataset checks, cleaning and splitting (pure: bytes in, records and counts out).

The validator (:mod:`kubetune_trainer.validate`) reads the JSONL files, and everything that
decides what a record is, whether it is usable, what is masked and where it goes lives here so it
can be tested without storage or a tokenizer:

- :func:`parse_jsonl` checks every line against the record format (``chat``: ``messages`` with
  roles; ``completion``: ``prompt``/``completion``; ``text``: ``text``) and names each bad line
  ``file:line: reason``; ``auto`` takes the format of the first line that parses as an object.
- :class:`PiiMasker` replaces e-mail addresses, phone numbers, ID-card numbers, credit-card
  numbers (Luhn-checked), IP addresses and user-given regexes with ``[KIND]`` and counts each.
- :func:`dedupe` drops exact and normalised (case/whitespace) duplicates.
- :func:`split_by_hash` holds out a fraction of examples by the content hash, so a record's side
  never depends on the file order or on the run: an example can never be in both splits.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kubetune_trainer.errors import ConfigError, DataError

FORMATS = ("chat", "completion", "text")
CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_REPORTED_ERRORS = 50


# Kinds of unusable lines, each reported with its own examples (a file full of bad JSON must not
# hide the lines whose JSON is fine but whose record is wrong).
INVALID_JSON = "invalidJson"
WRONG_SCHEMA = "wrongSchema"
EMPTY_CONTENT = "emptyContent"
KIND_NAMES = {
    INVALID_JSON: "invalid JSON",
    WRONG_SCHEMA: "wrong record schema",
    EMPTY_CONTENT: "empty content",
}
# Blank lines are skipped (JSONL allows none, but editors leave them): counted and reported as
# warnings, with the first few line numbers.
MAX_REPORTED_BLANK = 20


def error_kind(reason: str) -> str:
    """The kind of a ``check_record`` reason (or of a JSON parse error)."""
    if reason.startswith("invalid JSON"):
        return INVALID_JSON
    if "empty" in reason:
        return EMPTY_CONTENT
    return WRONG_SCHEMA


@dataclass
class LineError:
    """One unusable line: where it is, why, and the kind of problem."""

    file: str
    line: int
    reason: str
    kind: str = WRONG_SCHEMA

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"

    def dump(self) -> dict[str, Any]:
        """JSON form for the data report."""
        return {"file": self.file, "line": self.line, "reason": self.reason, "kind": self.kind}


@dataclass
class Parsed:
    """Outcome of reading one JSONL file."""

    file: str
    format: str
    records: list[dict[str, Any]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # source line of each record
    total_lines: int = 0
    invalid: int = 0
    errors: list[LineError] = field(default_factory=list)  # the first MAX_REPORTED_ERRORS per kind
    invalid_by_kind: dict[str, int] = field(default_factory=dict)
    blank: int = 0
    blank_lines: list[int] = field(default_factory=list)  # the first MAX_REPORTED_BLANK

    def add_error(self, line: int, reason: str) -> None:
        """Count an invalid line; keep its details while fewer than the cap of its kind are kept."""
        kind = error_kind(reason)
        self.invalid += 1
        kept = self.invalid_by_kind.get(kind, 0)
        self.invalid_by_kind[kind] = kept + 1
        if kept < MAX_REPORTED_ERRORS:
            self.errors.append(LineError(self.file, line, reason, kind))

    def examples_by_kind(self, limit: int) -> dict[str, list[LineError]]:
        """Up to ``limit`` kept errors of each kind, kinds in the order of their first line."""
        out: dict[str, list[LineError]] = {}
        for err in sorted(self.errors, key=lambda e: e.line):
            shown = out.setdefault(err.kind, [])
            if len(shown) < limit:
                shown.append(err)
        return out

    def errors_by_kind(self) -> dict[str, dict[str, Any]]:
        """The report's ``errorsByKind``: count and kept examples of every kind."""
        return {
            kind: {
                "count": self.invalid_by_kind.get(kind, 0),
                "examples": [e.dump() for e in errs],
            }
            for kind, errs in self.examples_by_kind(MAX_REPORTED_ERRORS).items()
        }

    def warnings(self) -> list[str]:
        """Problems that do not make a line invalid (blank lines), for the report."""
        if not self.blank:
            return []
        where = ", ".join(str(n) for n in self.blank_lines)
        more = (
            f" and {self.blank - len(self.blank_lines)} more"
            if self.blank > len(self.blank_lines)
            else ""
        )
        return [f"{self.file}: {self.blank} blank line(s) skipped (line {where}{more})"]


def detect_format(record: Any) -> str | None:
    """The format a record looks like, or None."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "prompt" in record and "completion" in record:
        return "completion"
    if "text" in record:
        return "text"
    return None


def check_record(record: Any, fmt: str) -> str | None:
    """Why ``record`` is not a valid ``fmt`` record, or None when it is."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if fmt == "chat":
        msgs = record.get("messages")
        if msgs is None:
            return (
                'missing field \'messages\' (chat format: {"messages": [{"role", "content"}, ...]})'
            )
        if not isinstance(msgs, list) or not msgs:
            return "'messages' must be a non-empty list"
        for i, msg in enumerate(msgs):
            if not isinstance(msg, dict):
                return f"messages[{i}] must be an object with 'role' and 'content'"
            role = msg.get("role")
            if role not in CHAT_ROLES:
                return f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}"
            if not isinstance(msg.get("content"), str):
                return f"messages[{i}].content must be a string"
            if role == "user" and not msg["content"].strip():
                return f"messages[{i}]: user turn with empty content (nothing to answer)"
        if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
            return "no assistant message with content (nothing to learn from)"
        return None
    if fmt == "completion":
        for key in ("prompt", "completion"):
            if key not in record:
                return f'missing field \'{key}\' (completion format: {{"prompt", "completion"}})'
            if not isinstance(record[key], str):
                return f"'{key}' must be a string"
        if not record["completion"].strip():
            return "'completion' is empty"
        return None
    if fmt == "text":
        if "text" not in record:
            return "missing field 'text' (text format: {\"text\": ...})"
        if not isinstance(record["text"], str) or not record["text"].strip():
            return "'text' must be a non-empty string"
        return None
    raise ValueError(f"unknown format {fmt!r}")


def parse_jsonl(data: bytes, file: str, fmt: str = "auto") -> Parsed:
    """Check every line of a JSONL file (see the module docstring).

    Blank lines are skipped but counted (``Parsed.blank``, reported as a warning); they are not
    lines of the dataset, so they count neither as valid nor as invalid.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{file}: not UTF-8 text (byte {exc.start}); a JSONL dataset must be UTF-8"
        ) from exc
    rows: list[tuple[int, Any]] = []
    parsed = Parsed(file=file, format=fmt)
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            # (The newline that ends the last line makes no line of its own: not counted.)
            parsed.blank += 1
            if len(parsed.blank_lines) < MAX_REPORTED_BLANK:
                parsed.blank_lines.append(lineno)
            continue
        parsed.total_lines += 1
        try:
            rows.append((lineno, json.loads(line)))
        except ValueError as exc:
            parsed.add_error(lineno, f"invalid JSON: {exc}")
    if fmt == "auto":
        fmt = next((f for _, r in rows if (f := detect_format(r))), None)
        if fmt is None:
            raise DataError(
                f'{file}: cannot detect the record format: no line is a chat ({{"messages"}}), '
                'completion ({"prompt", "completion"}) or text ({"text"}) record; '
                "fix the file or set dataset.format"
            )
        parsed.format = fmt
    for lineno, record in rows:
        reason = check_record(record, fmt)
        if reason:
            parsed.add_error(lineno, reason)
        else:
            parsed.records.append(record)
            parsed.lines.append(lineno)
    # Errors were appended in two passes (JSON, then shape): report them in line order.
    parsed.errors.sort(key=lambda e: e.line)
    return parsed


# --- PII ---------------------------------------------------------------------------------

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
BUILTIN_PII: dict[str, str] = {
    # Order matters: longer, more specific numbers are masked before phone numbers could
    # swallow them.
    "email": r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b",
    "creditCard": r"(?<!\d)\d(?:[ -]?\d){12,18}(?!\d)",
    "idCard": (
        r"(?<!\d)(?:\d{3}-\d{2}-\d{4}"  # US SSN
        r"|\d{17}[\dXx]"  # PRC resident ID
        r")(?![\dA-Za-z])"
    ),
    "ipAddress": (
        rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\d.]*\d)"
        r"|(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])"
    ),
    "phone": r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,3}(?!\w)",
}
PII_TOKENS = {
    "email": "EMAIL",
    "creditCard": "CREDIT_CARD",
    "idCard": "ID_CARD",
    "ipAddress": "IP_ADDRESS",
    "phone": "PHONE",
}


def luhn_ok(digits: str) -> bool:
    """Luhn checksum of a digit string (real card numbers pass; most other numbers do not)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


class PiiMasker:
    """Masks the requested PII kinds in every string of a record and counts matches per kind."""

    def __init__(self, kinds: Iterable[str] = (), custom: Iterable[tuple[str, str]] = ()):
        kinds = set(kinds)
        unknown = kinds - BUILTIN_PII.keys()
        if unknown:
            raise ConfigError(
                f"dataset.piiMasking.kinds: unknown kinds {sorted(unknown)}; known: {sorted(BUILTIN_PII)}"
            )
        self.rules: list[tuple[str, re.Pattern[str], str]] = [
            (kind, re.compile(rx), f"[{PII_TOKENS[kind]}]")
            for kind, rx in BUILTIN_PII.items()
            if kind in kinds
        ]
        for i, (name, rx) in enumerate(custom):
            try:
                pattern = re.compile(rx)
            except re.error as exc:
                raise ConfigError(
                    f"dataset.piiMasking.custom[{i}].regex: invalid regular expression {rx!r}: {exc}"
                ) from exc
            if pattern.match(""):
                raise ConfigError(
                    f"dataset.piiMasking.custom[{i}].regex: {rx!r} matches the empty string"
                )
            self.rules.append((name, pattern, f"[{name.upper()}]"))
        self.counts: dict[str, int] = {name: 0 for name, _, _ in self.rules}

    def __bool__(self) -> bool:
        return bool(self.rules)

    def mask_text(self, text: str) -> str:
        """``text`` with every match replaced (counted in ``self.counts``)."""
        for kind, pattern, token in self.rules:
            if kind == "creditCard":

                def repl(m: re.Match[str], token: str = token) -> str:
                    digits = re.sub(r"\D", "", m.group(0))
                    if 13 <= len(digits) <= 19 and luhn_ok(digits):
                        self.counts["creditCard"] += 1
                        return token
                    return m.group(0)

                text = pattern.sub(repl, text)
            elif kind == "phone":

                def repl_phone(m: re.Match[str], token: str = token) -> str:
                    # A phone number has 7 to 15 digits (E.164); shorter runs are years, counts...
                    if 7 <= len(re.sub(r"\D", "", m.group(0))) <= 15:
                        self.counts["phone"] += 1
                        return token
                    return m.group(0)

                text = pattern.sub(repl_phone, text)
            else:
                text, n = pattern.subn(token, text)
                self.counts[kind] += n
        return text

    def mask_record(self, record: Any) -> Any:
        """A copy of ``record`` with every string value masked (keys and roles untouched)."""
        if isinstance(record, str):
            return self.mask_text(record)
        if isinstance(record, list):
            return [self.mask_record(v) for v in record]
        if isinstance(record, dict):
            return {k: (v if k == "role" else self.mask_record(v)) for k, v in record.items()}
        return record


# --- identity, dedupe, split ------------------------------------------------------------------


def record_text(record: dict[str, Any]) -> str:
    """The content of a record as one string (roles included), for hashing and dedupe."""
    if "messages" in record:
        return "\n".join(f"{m['role']}: {m['content']}" for m in record["messages"])
    if "completion" in record:
        return f"{record['prompt']}\n{record['completion']}"
    return record["text"]


def normalised_key(record: dict[str, Any]) -> str:
    """Case- and whitespace-insensitive identity of a record (sha256 hex)."""
    norm = re.sub(r"\s+", " ", record_text(record)).strip().lower()
    return hashlib.sha256(norm.encode("utf-8")).hexdigest()


def exact_key(record: dict[str, Any]) -> str:
    """Byte-exact identity of a record (sha256 of its canonical JSON)."""
    return hashlib.sha256(
        json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8")
    ).hexdigest()


def dedupe(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int, int]:
    """``(kept, exact_duplicates, normalised_duplicates)``; the first occurrence is kept."""
    seen_exact: set[str] = set()
    seen_norm: set[str] = set()
    kept, exact, norm = [], 0, 0
    for record in records:
        ek, nk = exact_key(record), normalised_key(record)
        if ek in seen_exact:
            exact += 1
            continue
        if nk in seen_norm:
            norm += 1
            continue
        seen_exact.add(ek)
        seen_norm.add(nk)
        kept.append(record)
    return kept, exact, norm


def hash_fraction(record: dict[str, Any]) -> float:
    """A number in [0, 1) fixed by the record's normalised content."""
    return int(normalised_key(record)[:13], 16) / float(1 << 52)


def split_by_hash(
    records: list[dict[str, Any]], fraction: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, validation)``: a record is held out when its content hash is below ``fraction``.

    With a positive fraction and at least two records, the validation split is never empty: the
    record with the smallest hash is held out (still a function of the content alone).
    """
    if fraction <= 0:
        return list(records), []
    train, val = [], []
    for record in records:
        (val if hash_fraction(record) < fraction else train).append(record)
    if not val and len(train) >= 2:
        smallest = min(range(len(train)), key=lambda i: hash_fraction(train[i]))
        val.append(train.pop(smallest))
    return train, val


def remove_leaks(
    train: list[dict[str, Any]], validation: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], int]:
    """Drop training records whose normalised content also appears in the validation set."""
    held = {normalised_key(r) for r in validation}
    kept = [r for r in train if normalised_key(r) not in held]
    return kept, len(train) - len(kept)


def to_jsonl(records: Iterable[dict[str, Any]]) -> bytes:
    """Records as JSONL bytes (one compact object per line)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def from_jsonl(data: bytes) -> list[dict[str, Any]]:
    """Parse cleaned JSONL written by :func:`to_jsonl`."""
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
