"""The one time format of status fields and conditions: RFC 3339 in UTC with a ``Z`` suffix.

Kubernetes writes seconds (``2026-01-02T03:04:05Z``); the rollout machine writes milliseconds
because analysis intervals and pauses can be shorter than a second. ``parse_time`` reads both.
Every timestamp the operator, the local runtime and the test harnesses write goes through here,
so that ``kubectl``, ``kubetune get`` and the decision functions read the same text.
"""

from __future__ import annotations

import datetime


def format_time(now: datetime.datetime, *, millis: bool = False) -> str:
    """``now`` (timezone-aware) as RFC 3339 in UTC; with ``millis``, three fraction digits."""
    utc = now.astimezone(datetime.UTC)
    if millis:
        return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"
    return utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def now_rfc3339() -> str:
    """The current time in seconds precision (the form Kubernetes writes)."""
    return format_time(datetime.datetime.now(datetime.UTC))


def parse_time(text: str | None) -> datetime.datetime | None:
    """Inverse of ``format_time`` (either precision); None for None or "".

    Raises ValueError for text that is not RFC 3339: callers that read a field a person may
    have edited decide themselves whether that is "unknown" or an error.
    """
    if not text:
        return None
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
