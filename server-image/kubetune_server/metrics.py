"""Prometheus metrics of the server (docs/contracts.md, "Server metrics": names are stable).

The canary analysis (``kubetune.rollout.analysis``) reads ``kubetune_server_requests_total``
(5xx codes are errors), and the latency and TTFT histograms, and sums histograms across pods
bucket by bucket: the bucket bounds below are therefore part of the contract too: change them
and two revisions' pods can no longer be compared.

Each server gets its own registry (not the process-global one) so that several app instances
in one test process do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A request's mean time per output token: ~1.25x apart where engines decode (1 ms to 0.1 s), so
# the canary analysis' decoding-speed test counts a request above 1.5x stable's p99 at a bound
# at most 1.25x beyond that bar (coarser buckets undercount a slow decoder and cost power).
TPOT_BUCKETS = (
    *(0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.006, 0.008),
    *(0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.08),
    *(0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5),
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The server's metrics on a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "kubetune_server_requests",
            "Requests by served model and HTTP status code.",
            ["model", "code"],
            registry=r,
        )
        self.duration = Histogram(
            "kubetune_server_request_duration_seconds",
            "Time from receiving a request to its last byte.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "kubetune_server_time_to_first_token_seconds",
            "Time from receiving a request to its first generated token.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "kubetune_server_time_per_output_token_seconds",
            "Per request: time from its first to its last generated token over the tokens after"
            " the first (requests of two or more tokens; n > 1: the mean over its choices).",
            ["model"],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter(
            "kubetune_server_generated_tokens",
            "Completion tokens generated.",
            ["model"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "kubetune_server_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r
        )
        self.queue_depth = Gauge(
            "kubetune_server_queue_depth", "Sequences waiting for a batch.", registry=r
        )
        # The two autoscaling signals (docs/operations.md, "Autoscaling"): the queue says the
        # pod is saturated; in-flight requests say how much work it holds (queued + generating
        # + streaming), a per-pod figure an HPA or KEDA can target as an average.
        self.in_flight = Gauge(
            "kubetune_server_requests_in_flight",
            "Generation requests received and not yet answered (queued, generating or streaming).",
            registry=r,
        )
        self.batch_size = Histogram(
            "kubetune_server_batch_size",
            "Sequences per generation batch.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.info = Gauge(
            "kubetune_server_info",
            "Always 1: what this server serves.",
            ["revision", "model", "adapter_digest"],
            registry=r,
        )
