"""``python -m kubetune_trainer validate``: check, clean and split the dataset on CPU.

Steps (each documented in :mod:`kubetune_trainer.data`): read ``dataset.train`` (and
``dataset.validation``), check every line, mask PII, drop duplicates, split by content hash (or
drop train records leaking into a given validation file), tokenise with the base model's
tokenizer to count what ``maxSeqLength`` truncates, estimate the peak GPU memory of the spec from
the base model's config.json (:mod:`kubetune.finetune.memory`; never its weights), then write
under ``spec.output.uri``::

    data/train.jsonl, data/validation.jsonl   cleaned splits (what `train` reads)
    data/report.json                          full report, written LAST

Unusable data raises :class:`DataError` (exit 2) with a message that says what to fix and points
at the first bad lines; the full list (up to 50 lines per file) is in the report. A spec whose
memory estimate exceeds the GPU's memory raises :class:`ConfigError` (exit 2) once the report is
written, so no GPU is requested for a run that cannot fit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.finetune import memory
from kubetune_trainer import data
from kubetune_trainer.encoding import encode_record
from kubetune_trainer.errors import ConfigError, DataError
from kubetune_trainer.settings import Settings
from kubetune_trainer.sources import fetch_model, output_store, read_object

log = logging.getLogger("kubetune_trainer.validate")

REPORT_KEY = "data/report.json"
TRAIN_KEY = "data/train.jsonl"
VALIDATION_KEY = "data/validation.jsonl"
ERRORS_IN_MESSAGE = 5


@dataclass
class Validated:
    """What validation hands to training."""

    format: str
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    summary: dict[str, Any]  # DataReportSummary wire form
    digest: str
    memory: dict[str, Any] | None = None  # MemoryEstimate wire form


class MemoryTooSmall(ConfigError):
    """The memory estimate exceeds one GPU's memory (the message gives the numbers)."""


def load_tokenizer(settings: Settings) -> Any:
    """The base model's tokenizer (only tokenizer files are downloaded)."""
    from transformers import AutoTokenizer

    spec = settings.spec
    folder = fetch_model(spec.base_model.uri, spec.storage, settings.work_dir, tokenizer_only=True)
    return AutoTokenizer.from_pretrained(folder)


def estimate_memory(settings: Settings) -> dict[str, Any] | None:
    """``status.memoryEstimate`` for the spec, from the base model's config.json (None: unreadable).

    Only the tokenizer files (config.json among them) are fetched, never the weights. A model
    the estimator cannot count is logged and skipped: the estimate is advice, not a gate, unless
    it can be made.
    """
    spec = settings.spec
    folder = fetch_model(spec.base_model.uri, spec.storage, settings.work_dir, tokenizer_only=True)
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        est = memory.preflight(config, spec)
    except (OSError, ValueError) as exc:
        log.warning("no memory estimate for %s: %s", spec.base_model.uri, exc)
        return None
    log.info("memory estimate: %s (%s)", est.message, memory.describe(est))
    return est.status()


def describe_errors(parsed: data.Parsed, per_kind: int = ERRORS_IN_MESSAGE) -> str:
    """Examples of every kind of invalid line, grouped by kind, for a one-line message.

    "invalid JSON (120 lines): f:1: ...; f:2: ... | wrong record schema (30 lines): f:7: ..."
    """
    groups = []
    for kind, errs in parsed.examples_by_kind(per_kind).items():
        count = parsed.invalid_by_kind.get(kind, len(errs))
        more = f" (and {count - len(errs)} more)" if count > len(errs) else ""
        groups.append(
            f"{data.KIND_NAMES.get(kind, kind)} ({count} line{'s' if count != 1 else ''}): "
            + "; ".join(str(e) for e in errs)
            + more
        )
    return " | ".join(groups)


def file_report(parsed: data.Parsed, **extra: Any) -> dict[str, Any]:
    """One file's entry of report.json: its errors (grouped by kind too) and warnings."""
    return {
        "uri": parsed.file,
        **extra,
        "errors": [e.dump() for e in sorted(parsed.errors, key=lambda e: e.line)],
        "errorsTruncated": parsed.invalid > len(parsed.errors),
        "errorsByKind": parsed.errors_by_kind(),
        "blankLines": parsed.blank,
        "warnings": parsed.warnings(),
    }


def _fail_invalid(parsed: data.Parsed, limit: float, store: Any) -> None:
    """Raise DataError (after writing a failure report) when too many lines are invalid."""
    if parsed.total_lines == 0:
        raise DataError(f"{parsed.file}: the file is empty; it must hold one JSON record per line")
    frac = parsed.invalid / parsed.total_lines
    if parsed.invalid and frac > limit:
        shown = describe_errors(parsed)
        summary = {
            "format": parsed.format,
            "totalLines": parsed.total_lines,
            "valid": len(parsed.records),
            "invalid": parsed.invalid,
            "blankLines": parsed.blank,
            "reportUri": store.uri_for(REPORT_KEY),
        }
        # The full list of bad lines goes to the report, marked failed so that `train` never
        # takes it for a completed validation.
        store.write_json(
            REPORT_KEY,
            {
                "outcome": "data_error",
                "summary": summary,
                "files": [file_report(parsed)],
            },
        )
        exc = DataError(
            f"{parsed.invalid} of {parsed.total_lines} lines are invalid ({frac:.1%} > "
            f"dataset.maxInvalidFraction {limit:g}) as {parsed.format} records: {shown}. "
            f"Fix these lines or raise dataset.maxInvalidFraction"
        )
        exc.data_report = summary
        raise exc


def token_stats(lengths: list[int]) -> dict[str, Any]:
    """min/mean/p50/p95/max of token lengths."""
    if not lengths:
        return {}
    ordered = sorted(lengths)
    return {
        "min": ordered[0],
        "mean": round(statistics.fmean(ordered), 1),
        "p50": ordered[len(ordered) // 2],
        "p95": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))],
        "max": ordered[-1],
        "total": sum(ordered),
    }


def run_validate(settings: Settings, *, tokenizer: Any = None) -> Validated:
    """Validate, clean, split and store the dataset; raises DataError/ConfigError when unusable."""
    spec = settings.spec
    ds = spec.dataset
    started = time.time()
    masker = data.PiiMasker(
        ds.pii_masking.kinds, [(c.name, c.regex) for c in ds.pii_masking.custom]
    )

    store = output_store(spec.output.uri, spec.storage)
    train_raw = read_object(ds.train, spec.storage)
    parsed = data.parse_jsonl(train_raw, ds.train, ds.format)
    fmt = parsed.format
    _fail_invalid(parsed, ds.max_invalid_fraction, store)
    files = [parsed]
    val_parsed = None
    source_digests = {ds.train: "sha256:" + hashlib.sha256(train_raw).hexdigest()}
    if ds.validation:
        val_raw = read_object(ds.validation, spec.storage)
        source_digests[ds.validation] = "sha256:" + hashlib.sha256(val_raw).hexdigest()
        val_parsed = data.parse_jsonl(val_raw, ds.validation, fmt)
        _fail_invalid(val_parsed, ds.max_invalid_fraction, store)
        files.append(val_parsed)

    records = [masker.mask_record(r) for r in parsed.records] if masker else parsed.records
    exact = norm = 0
    if ds.dedupe:
        records, exact, norm = data.dedupe(records)
    leaked = 0
    if val_parsed is not None:
        val_records = (
            [masker.mask_record(r) for r in val_parsed.records] if masker else val_parsed.records
        )
        if ds.dedupe:
            val_records, vexact, vnorm = data.dedupe(val_records)
            exact, norm = exact + vexact, norm + vnorm
        train, leaked = data.remove_leaks(records, val_records)
        validation = val_records
    else:
        train, validation = data.split_by_hash(records, ds.validation_split)

    if len(train) < ds.min_examples:
        raise DataError(
            f"only {len(train)} usable training examples remain in {ds.train} (dataset.minExamples is "
            f"{ds.min_examples}; {parsed.invalid} invalid lines, {exact + norm} duplicates, "
            f"{len(validation)} held out for validation): add data or lower dataset.minExamples"
        )

    tokenizer = tokenizer or load_tokenizer(settings)
    mem = estimate_memory(settings)
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"dataset format chat needs a chat template, and the tokenizer of {spec.base_model.uri} has "
            "none: use a base model with a chat template (e.g. an instruct model) or write the "
            "dataset as completion ({prompt, completion}) or text records"
        )
    lengths: list[int] = []
    truncated = 0
    no_target = 0  # training examples whose labels were all cut off by truncation
    for i, record in enumerate(train + validation):
        enc = encode_record(tokenizer, record, fmt, ds.max_seq_length)
        lengths.append(enc.full_length)
        truncated += enc.truncated
        if i < len(train):
            no_target += all(label == -100 for label in enc.labels)
    if no_target == len(train):
        raise DataError(
            f"dataset.maxSeqLength {ds.max_seq_length} cuts off every training target (the answers "
            f"start after that many tokens): raise dataset.maxSeqLength"
        )

    train_bytes, val_bytes = data.to_jsonl(train), data.to_jsonl(validation)
    digest = "sha256:" + hashlib.sha256(train_bytes + b"\0" + val_bytes).hexdigest()
    summary = {
        "format": fmt,
        "totalLines": sum(p.total_lines for p in files),
        "valid": sum(len(p.records) for p in files),
        "invalid": sum(p.invalid for p in files),
        "blankLines": sum(p.blank for p in files),
        "duplicates": exact + norm,
        "piiMasked": dict(masker.counts),
        "trainExamples": len(train),
        "validationExamples": len(validation),
        "truncated": truncated,
        "digest": digest,
        "reportUri": store.uri_for(REPORT_KEY),
    }
    report = {
        "outcome": "succeeded",
        "summary": summary,
        "files": [
            file_report(
                p,
                digest=source_digests[p.file],
                lines=p.total_lines,
                valid=len(p.records),
                invalid=p.invalid,
            )
            for p in files
        ],
        "duplicates": {"exact": exact, "normalised": norm},
        "leakedFromTrain": leaked,
        "splitBy": "file" if val_parsed is not None else f"contentHash<{ds.validation_split:g}",
        "tokens": {
            "maxSeqLength": ds.max_seq_length,
            "truncated": truncated,
            "withoutTarget": no_target,
            "lengths": token_stats(lengths),
        },
        "outputs": {"train": store.uri_for(TRAIN_KEY), "validation": store.uri_for(VALIDATION_KEY)},
        "seconds": round(time.time() - started, 3),
    }
    if mem is not None:
        report["memory"] = mem
    for p in files:
        for warning in p.warnings():
            log.warning("%s", warning)
    store.write_bytes(TRAIN_KEY, train_bytes)
    store.write_bytes(VALIDATION_KEY, val_bytes)
    # Written last: a report proves the cleaned splits beside it are complete.
    store.write_json(REPORT_KEY, report)
    log.info(
        "validated %s: %d train / %d validation examples (%d invalid lines, %d duplicates, %d truncated)",
        ds.train,
        len(train),
        len(validation),
        summary["invalid"],
        summary["duplicates"],
        truncated,
    )
    if mem is not None and mem.get("fits") is False:
        exc = MemoryTooSmall(mem["message"])
        exc.data_report = summary
        exc.memory_estimate = mem
        raise exc
    return Validated(fmt, train, validation, summary, digest, mem)


def load_validated(settings: Settings, *, tokenizer: Any = None) -> Validated:
    """The validator's output under spec.output.uri, or a fresh validation when there is none."""
    spec = settings.spec
    store = output_store(spec.output.uri, spec.storage)
    report = store.read_json(REPORT_KEY) if store.exists(REPORT_KEY) else None
    if report is not None and report.get("outcome") == "succeeded":
        train = data.from_jsonl(store.read_bytes(TRAIN_KEY))
        validation = data.from_jsonl(store.read_bytes(VALIDATION_KEY))
        summary = report["summary"]
        return Validated(
            summary["format"], train, validation, summary, summary["digest"], report.get("memory")
        )
    log.info("no %s under %s: validating the dataset first", REPORT_KEY, spec.output.uri)
    return run_validate(settings, tokenizer=tokenizer)


def local_file_uri(path: Path) -> str:
    """file:// URI of a local path (helper for tests and the CLI)."""
    return path.resolve().as_uri()
