"""Failure classes of the trainer and how each maps to a termination outcome and exit code.

docs/contracts.md fixes the mapping the operator relies on: exit 0 succeeded, 2 data or config
error (never retried: a retry cannot fix the input), 3 storage error, 143 preempted after a
SIGTERM checkpoint, 1 anything else (out of memory included: the outcome field tells them
apart, so the operator can report OOMKilled without guessing from the exit code).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_OTHER = 1
EXIT_INPUT = 2
EXIT_STORAGE = 3
EXIT_PREEMPTED = 143


class TrainerError(Exception):
    """A failure with a known outcome; the message says what to fix."""

    outcome = "other"
    exit_code = EXIT_OTHER


class DataError(TrainerError):
    """The dataset is unusable (format, too many invalid lines, too few examples)."""

    outcome = "data_error"
    exit_code = EXIT_INPUT


class ConfigError(TrainerError):
    """The spec or the environment cannot work (e.g. QLoRA without a GPU, bad regex)."""

    outcome = "config_error"
    exit_code = EXIT_INPUT


class Preempted(TrainerError):
    """SIGTERM arrived; a checkpoint was written (when training had started)."""

    outcome = "preempted"
    exit_code = EXIT_PREEMPTED


def classify(exc: BaseException) -> tuple[str, int, str]:
    """``(outcome, exit_code, message)`` for any exception that ends a run."""
    # NB: imported lazily so that `validate` (no torch needed for the classification itself)
    # and the unit tests stay light.
    from kubetune.storage import StorageError

    if isinstance(exc, TrainerError):
        return exc.outcome, exc.exit_code, str(exc)
    if isinstance(exc, StorageError):
        return "storage_error", EXIT_STORAGE, f"storage error: {exc}"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return (
            "oom",
            EXIT_OTHER,
            f"out of memory: {exc}. Lower hyperparameters.batchSize or dataset.maxSeqLength, or use qlora",
        )
    return "other", EXIT_OTHER, f"{type(exc).__name__}: {exc}"
