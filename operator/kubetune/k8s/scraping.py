"""Fetching canary figures: the revision pods' /metrics, Prometheus queries, the eval gate.

Only the fetching lives here; the arithmetic (parsing, summing, interval deltas, quantiles) is
``kubetune.rollout.analysis``, the same code the local runtime runs on its processes' ports.

Built-in provider: every *ready* pod of a revision is scraped at ``http://<podIP>:<port>/metrics``
where the port is the pod's own container port named ``http`` (read from the pod, not the
ModelDeployment spec, so a scrape always matches what the pod really listens on), and read
through the metric map of the pod's own engine (its ``kubetune.io/engine`` label; none means
builtin). The pods' cumulative counters are summed. When a ready pod cannot be scraped the whole revision is
reported as not scraped: a sum over fewer pods than the baseline would go backwards and be
discarded anyway, and an explicit error is clearer.

Prometheus provider: the same cumulative counters, as instant sums over the series labelled
with the revision's ``namespace`` and ``revision`` (``prometheus_counters``), with the same rule:
a revision with no target, or a target down, is an error naming the labels. Custom query
templates instead return interval figures (``query_prometheus``).

Eval gate: ``run_eval_gate`` loads the golden prompts (inline, or the ``promptsUri`` JSONL
through kubetune.storage), sends them to a ready canary pod (and a stable one for
``maxScoreDrop``) and scores them with ``kubetune.rollout.evalgate``. It is the one
implementation: the local runtime calls it with its processes' URLs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import aiohttp

from kubetune.api.common import LABEL_ENGINE
from kubetune.rollout import analysis as an
from kubetune.rollout import evalgate
from kubetune.rollout.metricmaps import metric_map

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT = 2.0


def pod_is_ready(pod: Mapping[str, Any]) -> bool:
    """Running with the Ready condition True and an IP (what an Endpoints controller would list)."""
    status = pod.get("status") or {}
    if status.get("phase") != "Running" or not status.get("podIP"):
        return False
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def pod_url(pod: Mapping[str, Any], port_name: str = "http") -> str | None:
    """``http://<podIP>:<containerPort named port_name>``; None without IP or port."""
    ip = (pod.get("status") or {}).get("podIP")
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == port_name and port.get("containerPort"):
                host = f"[{ip}]" if ip and ":" in ip else ip
                return f"http://{host}:{port['containerPort']}" if ip else None
    return None


def pod_engine(pod: Mapping[str, Any]) -> str | None:
    """The serving engine a pod runs (label ``kubetune.io/engine``; None: builtin)."""
    return ((pod.get("metadata") or {}).get("labels") or {}).get(LABEL_ENGINE)


def metrics_url(pod: Mapping[str, Any], port_name: str = "http") -> str | None:
    """``<pod_url>/metrics``; None without IP or port."""
    base = pod_url(pod, port_name)
    return f"{base}/metrics" if base else None


async def _fetch(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT)) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}")
        return await resp.text()


async def scrape_revision(
    session: aiohttp.ClientSession, pods: Iterable[Mapping[str, Any]]
) -> tuple[an.RevisionCounters | None, str | None]:
    """Sum the counters of a revision's ready pods: ``(counters, None)`` or ``(None, error)``."""
    targets = [
        (url, pod_engine(p)) for p in pods if pod_is_ready(p) and (url := metrics_url(p))
    ]
    if not targets:
        return None, "no ready pods to scrape"
    results = await asyncio.gather(
        *(_fetch(session, url) for url, _ in targets), return_exceptions=True
    )
    counters = []
    for (url, engine), result in zip(targets, results, strict=True):
        if isinstance(result, BaseException):
            return None, f"scraping {url} failed: {result}"
        try:
            counters.append(an.counters_from_text(result, metric_map(engine)))
        except ValueError as exc:
            return None, f"{url}: {exc}"
    return an.sum_counters(counters), None


async def readiness_failure(
    session: aiohttp.ClientSession, pods: Iterable[Mapping[str, Any]]
) -> tuple[str, str] | None:
    """``(reason, message)`` of a running, unready pod whose /readyz says it never will be.

    Asked only of pods that are Running but not Ready (a ready pod has nothing to say, a
    pending one no server yet); a pod that does not answer is left to the probes.
    """
    from kubetune.rollout.builders import readiness_failure as parse

    for pod in pods:
        status = pod.get("status") or {}
        if status.get("phase") != "Running" or pod_is_ready(pod):
            continue
        base = pod_url(pod)
        if not base:
            continue
        try:
            async with session.get(
                base + "/readyz", timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT)
            ) as resp:
                found = parse(await resp.text()) if resp.status == 503 else None
        except (aiohttp.ClientError, TimeoutError, OSError):
            continue
        if found:
            return found[0], f"pod {pod['metadata']['name']}: {found[1]}"
    return None


async def _prom_query(
    session: aiohttp.ClientSession, address: str, query: str
) -> tuple[str, list[Any]]:
    """``(resultType, result)`` of an instant query; RuntimeError naming Prometheus' error."""
    url = address.rstrip("/") + "/api/v1/query"
    async with session.get(
        url, params={"query": query}, timeout=aiohttp.ClientTimeout(total=5)
    ) as resp:
        payload = await resp.json(content_type=None)
    if resp.status != 200 or payload.get("status") != "success":
        raise RuntimeError(
            f"Prometheus query failed ({resp.status}): {payload.get('error', payload)!s:.200}"
        )
    return payload["data"].get("resultType", ""), payload["data"]["result"]


async def _prom_value(session: aiohttp.ClientSession, address: str, query: str) -> float | None:
    kind, result = await _prom_query(session, address, query)
    if kind == "scalar":
        value = float(result[1])
    elif not result:
        return None
    else:
        value = float(result[0]["value"][1])
    return None if value != value else value  # NaN (0/0) means no data


async def _prom_vector(
    session: aiohttp.ClientSession, address: str, query: str
) -> list[an.Sample]:
    """An instant vector as samples (labels as returned; the metric name is the caller's)."""
    kind, result = await _prom_query(session, address, query)
    if kind != "vector":
        raise RuntimeError(f"Prometheus query returned a {kind}, not a vector: {query}")
    return [
        an.Sample("", item.get("metric") or {}, float(item["value"][1])) for item in result
    ]


async def prometheus_counters(
    session: aiohttp.ClientSession,
    provider: Any,
    namespace: str,
    revision: str,
    engine: str | None = None,
) -> tuple[an.RevisionCounters | None, str | None]:
    """A revision's cumulative counters from Prometheus: ``(counters, None)`` or ``(None, error)``.

    The prometheus provider's default (``analysis.counter_queries`` of the revision's ``engine``
    metric map): the same counters the built-in provider scrapes from the pods, so the machine
    treats both alike.
    """
    metrics = metric_map(engine)
    queries = {
        key: an.render_query(template, namespace, revision)
        for key, template in an.counter_queries(metrics).items()
    }
    try:
        results = await asyncio.gather(
            *(_prom_vector(session, provider.address, q) for q in queries.values())
        )
    except (aiohttp.ClientError, TimeoutError, RuntimeError, ValueError, KeyError) as exc:
        return None, f"Prometheus at {provider.address}: {str(exc) or type(exc).__name__}"
    return an.counters_from_prometheus(
        namespace, revision, dict(zip(queries, results, strict=True)), metrics
    )


async def query_prometheus(
    session: aiohttp.ClientSession,
    provider: Any,
    namespace: str,
    revision: str,
    interval_text: str,
    engine: str | None = None,
) -> an.IntervalMetrics:
    """Interval figures of one revision from custom ``analysis.prometheus`` query templates.

    Only when ``analysis.uses_counters`` is False (a template is set); a template left unset
    defaults to the query of the revision's ``engine`` metric map.
    """
    defaults = an.default_queries(metric_map(engine))
    templates = {
        "requests": provider.requests_query or defaults["requests"],
        "errorRate": provider.error_rate_query or defaults["errorRate"],
        "latencyP95": provider.latency_p95_query or defaults["latencyP95"],
        "ttftP95": provider.ttft_p95_query or defaults["ttftP95"],
    }
    values = {}
    for key, template in templates.items():
        values[key] = await _prom_value(
            session, provider.address, an.render_query(template, namespace, revision, interval_text)
        )
    return an.IntervalMetrics(
        requests=values["requests"] or 0.0,
        error_rate=values["errorRate"],
        p95_latency_seconds=values["latencyP95"],
        ttft_p95_seconds=values["ttftP95"],
    )


# --- the eval gate (both runtimes) ----------------------------------------------------------

#: Golden prompts in flight at once against one pod (a server batches them; more would only queue).
EVAL_CONCURRENCY = 8
EVAL_TIMEOUT = 60.0


def ready_urls(pods: Iterable[Mapping[str, Any]]) -> list[str]:
    """``http://<podIP>:<port>`` of each ready pod (the eval gate's candidates)."""
    return [u for u in (pod_url(p) for p in pods if pod_is_ready(p)) if u]


async def load_prompts(gate: Any, storage: Any = None) -> list[Any]:
    """The gate's golden prompts: inline ``prompts``, else the ``promptsUri`` JSONL file.

    The file is read through :func:`kubetune.storage.open_store` (s3:// with ``spec.storage``'s
    endpoint and the reader's own credentials, or file://) in a worker thread, so the event loop
    never blocks on the object store. Any problem raises ValueError starting with the field path
    (``spec.rollout.evalGate.promptsUri: <uri> line N: ...``).
    """
    if gate.prompts:
        return list(gate.prompts)
    uri = gate.prompts_uri
    field = evalgate.PROMPTS_URI_FIELD
    if not uri:
        raise ValueError(f"{field}: not set and evalGate.prompts is empty")
    from kubetune.storage import StorageError, open_store

    parent, _, key = uri.rstrip("/").rpartition("/")
    try:
        text = await asyncio.to_thread(lambda: open_store(parent, storage).read_text(key))
    except (StorageError, OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{field}: {uri}: {exc}") from None
    try:
        return evalgate.parse_prompts(text, uri)
    except ValueError as exc:
        raise ValueError(f"{field}: {exc}") from None


async def golden_prompt_score(
    session: aiohttp.ClientSession,
    pods: Iterable[Mapping[str, Any]],
    gate: Any,
    model_name: str,
    timeout: float = EVAL_TIMEOUT,
    headers: Mapping[str, str] | None = None,
    prompts: Sequence[Any] | None = None,
) -> tuple[float | None, str | None]:
    """Send the golden prompts to one of these pods: ``(score, None)`` or ``(None, error)``.

    ``prompts`` default to the gate's inline ones. See :func:`score_at` for the rules.
    """
    urls = ready_urls(pods)
    if not urls:
        return None, "no ready pod to run the golden prompts against"
    chosen = list(gate.prompts) if prompts is None else list(prompts)
    return await score_at(session, urls[0], chosen, gate, model_name, timeout, headers)


async def score_at(
    session: aiohttp.ClientSession,
    url: str,
    prompts: Sequence[Any],
    gate: Any,
    model_name: str,
    timeout: float = EVAL_TIMEOUT,
    headers: Mapping[str, str] | None = None,
) -> tuple[float | None, str | None]:
    """Send ``prompts`` to the server at ``url``: ``(score, None)`` or ``(None, error)``.

    The first prompt goes alone: it opens the connection, and a server that loads lazily does so
    once. The rest then go concurrently, at most ``EVAL_CONCURRENCY`` at a time, so a large set
    is batched by the server instead of waiting for one answer after another. A failed single
    request counts as a wrong answer (``evalgate.score``). No answer at all is an error, not a
    score: the state machine waits and asks again, bounded by the progress deadline.
    """
    if not prompts:
        return None, "no golden prompts to send"
    errors: list[str] = []
    limit = asyncio.Semaphore(EVAL_CONCURRENCY)

    async def ask(prompt: Any) -> str | None:
        body = evalgate.request_body(prompt, model_name, gate)
        try:
            async with limit, session.post(
                url + "/v1/completions",
                json=body,
                headers=dict(headers or {}),
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                if resp.status != 200:
                    errors.append(f"HTTP {resp.status}")
                    return None
                payload = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            errors.append(str(exc) or type(exc).__name__)
            return None
        return evalgate.answer_of(payload if isinstance(payload, dict) else {})

    first = await ask(prompts[0])
    rest = await asyncio.gather(*(ask(p) for p in prompts[1:]))
    answers = [first, *rest]
    if all(a is None for a in answers):
        why = errors[0] if errors else "empty answers"
        return None, f"{url}: no golden prompt answered ({why})"
    return evalgate.score(prompts, answers, gate.match), None


async def run_eval_gate(
    session: aiohttp.ClientSession,
    md: Mapping[str, Any],
    due: tuple[str, bool],
    urls_of: Callable[[str], Sequence[str]],
    api_key: str | None = None,
    key_error: str | None = None,
) -> evalgate.EvalGateObservation:
    """Run the eval gate ``machine.eval_gate_due(md)`` asked for: the one path of both runtimes.

    ``urls_of(revision)`` gives the base URLs of a revision's ready pods (the operator: pod IPs;
    the local runtime: its replicas' ports). ``api_key`` is the serving pods' key
    (``spec.server.apiKeySecret``) as the runtime found it, or ``key_error`` why it could not.
    The prompts are loaded first (a bad file is named before anything is sent); then the canary
    is scored and, when ``due`` asks for it and the canary answered, the stable revision too.
    """
    from kubetune.api.modeldeployment import ModelDeploymentSpec

    canary, with_stable = due
    spec = ModelDeploymentSpec.model_validate(md.get("spec") or {})
    gate = spec.rollout.eval_gate
    if gate is None:
        return evalgate.EvalGateObservation(canary, None, error="spec.rollout.evalGate: not set")
    try:
        prompts = await load_prompts(gate, spec.storage)
    except ValueError as exc:
        return evalgate.EvalGateObservation(canary, None, error=str(exc))
    if key_error is not None:
        return evalgate.EvalGateObservation(canary, None, error=key_error)
    name = evalgate.model_name(md, spec.model.name)
    headers = evalgate.auth_headers(api_key)

    async def score_of(revision: str) -> tuple[float | None, str | None]:
        urls = list(urls_of(revision))
        if not urls:
            return None, f"no ready pod of revision {revision} to run the golden prompts against"
        return await score_at(session, urls[0], prompts, gate, name, headers=headers)

    canary_score, error = await score_of(canary)
    if canary_score is None:
        return evalgate.EvalGateObservation(canary, None, error=error, prompts=len(prompts))
    stable_score = None
    stable = ((md.get("status") or {}).get("stable") or {}).get("name")
    if with_stable and stable:
        stable_score, _ = await score_of(stable)
    return evalgate.EvalGateObservation(canary, canary_score, stable_score, prompts=len(prompts))
