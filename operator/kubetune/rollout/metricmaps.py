"""One metric map per serving engine: where its ``/metrics`` keeps what the canary analysis reads.

The analysis (``kubetune.rollout.analysis``) needs the same quantities from every engine:
requests by outcome (answered, and of those the server errors), a latency histogram, a
time-to-first-token histogram, a histogram of each request's time per output token (decoding
speed; optional), and tokens (generated, prompt). Each engine exports them under
its own names; a ``MetricMap`` says which, so the built-in scraper and the Prometheus
provider's default queries read every engine through the same code.

``builtin`` (kubetune_server): the names of docs/contracts.md, "Server metrics". A request is a
``POST /v1/*`` answer; an error is a 5xx ``code``.

``vllm`` (the OpenAI-compatible ``vllm serve``): the names vLLM documents (docs/design/metrics.md
and ``vllm/v1/metrics/loggers.py`` in vllm-project/vllm). vLLM has no per-request error counter
like ``kubetune_server_requests_total{code="5.."}``: its ``vllm:request_success_total`` counts
requests the *engine* finished, by ``finished_reason`` (stop, length, abort, and since 0.11
error, repetition), and a request refused before the engine (a bad body, an unknown model) or
failed by the server around it is not in it at all. Errors are therefore read from the HTTP
layer, the ``http_requests_total{handler, method, status}`` counter that vLLM's API server
exports through prometheus-fastapi-instrumentator (vllm-project/vllm PR #15657; ``status`` is
grouped as ``2xx``/``4xx``/``5xx``): requests are every ``/v1/...`` handler's answers, errors
the ``5xx`` ones -- the same definition as the built-in server's. A vLLM too old to export
``http_requests_total`` falls back, per scrape, to ``vllm:request_success_total`` for requests
and its ``finished_reason="error"`` (an internal error vLLM always answers with a 500) for
errors; ``abort`` (the client went away) is not an error, as 499 is not for kubetune_server.

Latency is vLLM's ``vllm:e2e_request_latency_seconds`` (engine arrival to last token; it leaves
out HTTP parsing, which kubetune_server's histogram includes) and TTFT its
``vllm:time_to_first_token_seconds``. Decoding speed is
``vllm:request_time_per_output_token_seconds`` (one observation per request, its mean time per
output token; vLLM 0.11 and later): not the older ``vllm:time_per_output_token_seconds``, which
observes every token, so its count is tokens and its observations are not independent requests
(the sequential test counts requests). A vLLM without it simply has no decoding-speed test.
Both engines' histograms have their own buckets; the
analysis never adds histograms of different engines (each revision is scraped with its own
map and judged from its own quantiles and bucket counts).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

BUILTIN = "builtin"
VLLM = "vllm"
ENGINES = (BUILTIN, VLLM)


@dataclass(frozen=True)
class CounterRule:
    """A counter, the label values a sample must have and the ones it must not.

    ``labels`` are full-match regular expressions in the RE2 subset PromQL accepts (no
    look-arounds), so the same rule reads a scrape here and selects series in Prometheus;
    ``exclude`` are exact values.
    """

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    exclude: Mapping[str, str] = field(default_factory=dict)

    def matches(self, name: str, labels: Mapping[str, str]) -> bool:
        """Whether a sample ``name{labels}`` belongs to this rule."""
        if name != self.name:
            return False
        if any(labels.get(key, "") == value for key, value in self.exclude.items()):
            return False
        return all(re.fullmatch(rx, labels.get(key, "")) for key, rx in self.labels.items())

    def selector(self, base: str) -> str:
        """PromQL ``name{base,label=~"rx",label!="v"}``; ``base`` is the part inside the braces."""
        parts = [base] if base else []
        parts += [f'{key}=~"{rx}"' for key, rx in sorted(self.labels.items())]
        parts += [f'{key}!="{value}"' for key, value in sorted(self.exclude.items())]
        return f"{self.name}{{{','.join(parts)}}}"


@dataclass(frozen=True)
class MetricMap:
    """Where one engine's exposition keeps the analysis' quantities (module docstring)."""

    engine: str
    requests: CounterRule
    errors: CounterRule
    latency: str
    ttft: str
    generated_tokens: str
    prompt_tokens: str
    # Histogram with ONE observation per request: its mean time per output token (decoding
    # speed). None: the engine has none, and the analysis has no decoding-speed test.
    tpot: str | None = None
    # Used for a scrape in which ``requests`` has no sample at all (an engine version that does
    # not export it); both counters start at 0 with the process, so a revision whose pods move
    # from one source to the other between two scrapes still yields a true difference.
    fallback_requests: CounterRule | None = None
    fallback_errors: CounterRule | None = None


BUILTIN_MAP = MetricMap(
    engine=BUILTIN,
    requests=CounterRule("kubetune_server_requests_total"),
    errors=CounterRule("kubetune_server_requests_total", {"code": "5.."}),
    latency="kubetune_server_request_duration_seconds",
    ttft="kubetune_server_time_to_first_token_seconds",
    generated_tokens="kubetune_server_generated_tokens_total",
    prompt_tokens="kubetune_server_prompt_tokens_total",
    tpot="kubetune_server_time_per_output_token_seconds",
)

# The OpenAI routes vLLM serves under /v1 (completions, chat/completions, embeddings, ...);
# /health, /metrics, /ping and /v1/models are GETs that never reach the engine, and
# /v1/models is excluded so a client listing models is not counted as traffic.
_VLLM_ROUTES = {"handler": "/v1/.*"}
_NOT_MODELS = {"handler": "/v1/models"}

VLLM_MAP = MetricMap(
    engine=VLLM,
    requests=CounterRule("http_requests_total", _VLLM_ROUTES, _NOT_MODELS),
    # "5xx" as the instrumentator groups codes; "5.." also matches ungrouped "503".
    errors=CounterRule("http_requests_total", {**_VLLM_ROUTES, "status": "5.."}, _NOT_MODELS),
    latency="vllm:e2e_request_latency_seconds",
    ttft="vllm:time_to_first_token_seconds",
    generated_tokens="vllm:generation_tokens_total",
    prompt_tokens="vllm:prompt_tokens_total",
    tpot="vllm:request_time_per_output_token_seconds",
    fallback_requests=CounterRule("vllm:request_success_total"),
    fallback_errors=CounterRule("vllm:request_success_total", {"finished_reason": "error"}),
)

METRIC_MAPS: dict[str, MetricMap] = {BUILTIN: BUILTIN_MAP, VLLM: VLLM_MAP}


def metric_map(engine: str | None) -> MetricMap:
    """The map of ``engine`` (None: builtin, the engine of pods older than the engine field)."""
    try:
        return METRIC_MAPS[engine or BUILTIN]
    except KeyError:
        raise ValueError(f"unknown serving engine {engine!r}: use one of {ENGINES}") from None
