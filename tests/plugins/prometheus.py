"""Pytest plugin: a real Prometheus server on loopback (Debian's ``prometheus`` package).

What it provides:

- ``prometheus_bin`` (session fixture): the ``prometheus`` binary. ``make prometheus-bin`` (a
  prerequisite of ``make test``) installs the Debian package when it is missing; a run without
  it fails here and says so: the tests that need it never skip.
- ``prometheus`` (fixture): a factory ``(scrape_configs) -> PrometheusServer`` that starts the
  binary on a free loopback port with its own TSDB under the test's ``tmp_path`` and stops it
  (SIGTERM) after the test.
- :func:`podmonitor_scrape_config`: the scrape job the Prometheus Operator generates for a
  PodMonitor: its selector and port as ``keep`` rules, the ``namespace``/``pod``/``container``/
  ``endpoint``/``job`` target labels it adds to every PodMonitor target, then the PodMonitor's
  own relabelings (camelCase fields turned into Prometheus' snake_case). Only the service
  discovery differs: a ``file_sd`` file stands in for ``kubernetes_sd``.
- :func:`pod_targets`: the file_sd target group ``kubernetes_sd`` (role pod) would produce for a
  pod object and its container port: ``__address__`` and the ``__meta_kubernetes_pod_*`` labels,
  pod labels sanitized the way Prometheus does (``kubetune.io/revision`` ->
  ``__meta_kubernetes_pod_label_kubetune_io_revision``).

So a test can render the chart's PodMonitor, take the pods the operator's builders made, and
let a real Prometheus decide which labels their series get.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from kubetune.local.containers import free_port

INSTALL_HINT = (
    "the prometheus binary is missing: run `make prometheus-bin` (apt-get install prometheus, "
    "Debian's package; `make test` does it)"
)


def _sanitize(name: str) -> str:
    # Prometheus' strutil.SanitizeLabelName: every character outside [a-zA-Z0-9_] becomes _.
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def pod_targets(pod: Mapping[str, Any], address: str, port_name: str = "http") -> dict[str, Any]:
    """The file_sd target group kubernetes_sd (role pod) gives ``pod``'s port ``port_name``.

    ``address`` is where the test's process really listens (host:port): the pod object's IP
    and port are the operator's, the process is on loopback.
    """
    meta = pod["metadata"]
    container = pod["spec"]["containers"][0]
    port = next(p for p in container.get("ports") or [] if p.get("name") == port_name)
    labels = {
        "__meta_kubernetes_namespace": meta["namespace"],
        "__meta_kubernetes_pod_name": meta["name"],
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_pod_ready": "true",
        "__meta_kubernetes_pod_container_name": container["name"],
        "__meta_kubernetes_pod_container_port_name": port_name,
        "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
    }
    for key, value in (meta.get("labels") or {}).items():
        labels[f"__meta_kubernetes_pod_label_{_sanitize(key)}"] = value
        labels[f"__meta_kubernetes_pod_labelpresent_{_sanitize(key)}"] = "true"
    return {"targets": [address], "labels": labels}


_RELABEL_FIELDS = {
    "sourceLabels": "source_labels",
    "targetLabel": "target_label",
    "separator": "separator",
    "regex": "regex",
    "replacement": "replacement",
    "action": "action",
    "modulus": "modulus",
}


def _relabel(rule: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(rule) - set(_RELABEL_FIELDS)
    assert not unknown, f"relabeling field(s) {unknown} not translated"
    return {_RELABEL_FIELDS[k]: v for k, v in rule.items()}


def podmonitor_scrape_config(
    podmonitor: Mapping[str, Any], sd_file: Path, scrape_interval: str = "1s"
) -> list[dict[str, Any]]:
    """One scrape job per podMetricsEndpoint, as the Prometheus Operator generates them.

    The ``interval`` of the PodMonitor is replaced by ``scrape_interval`` (a test cannot wait
    15 s per sample); everything that decides a series' labels is kept.
    """
    meta, spec = podmonitor["metadata"], podmonitor["spec"]
    jobs = []
    for i, endpoint in enumerate(spec["podMetricsEndpoints"]):
        keep = [
            {
                "action": "keep",
                "source_labels": [
                    f"__meta_kubernetes_pod_label_{_sanitize(k)}",
                    f"__meta_kubernetes_pod_labelpresent_{_sanitize(k)}",
                ],
                "regex": f"({v});true",
            }
            for k, v in sorted(spec["selector"].get("matchLabels", {}).items())
        ]
        generated = [
            {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"},
            {
                "action": "drop",
                "source_labels": ["__meta_kubernetes_pod_phase"],
                "regex": "(Failed|Succeeded)",
            },
            *keep,
            {
                "action": "keep",
                "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                "regex": endpoint["port"],
            },
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {
                "source_labels": ["__meta_kubernetes_pod_container_name"],
                "target_label": "container",
            },
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"target_label": "job", "replacement": f"{meta['namespace']}/{meta['name']}"},
            {"target_label": "endpoint", "replacement": endpoint["port"]},
        ]
        jobs.append(
            {
                "job_name": f"podMonitor/{meta['namespace']}/{meta['name']}/{i}",
                "honor_labels": bool(endpoint.get("honorLabels", False)),
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "metrics_path": endpoint.get("path", "/metrics"),
                "file_sd_configs": [{"files": [str(sd_file)], "refresh_interval": "1s"}],
                "relabel_configs": generated
                + [_relabel(r) for r in endpoint.get("relabelings") or []],
            }
        )
    return jobs


class PrometheusServer:
    """A running ``prometheus`` with a given config, on a free loopback port."""

    def __init__(self, binary: str, workdir: Path, scrape_configs: list[dict[str, Any]]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": scrape_configs,
                }
            )
        )
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        """Everything Prometheus printed so far."""
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll /-/ready until 200; fail with Prometheus' log when it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"prometheus not ready after {timeout}s:\n{self.log()}")

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The result of an instant query (a vector's items)."""
        resp = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5)
        payload = resp.json()
        assert payload["status"] == "success", payload
        return payload["data"]["result"]

    def targets(self) -> list[dict[str, Any]]:
        """Active targets with their final labels and last scrape error."""
        resp = httpx.get(f"{self.url}/api/v1/targets", params={"state": "active"}, timeout=5)
        return resp.json()["data"]["activeTargets"]

    def wait_for(
        self,
        promql: str,
        predicate: Callable[[list[dict[str, Any]]], bool],
        what: str,
        timeout: float = 60.0,
    ) -> list[dict[str, Any]]:
        """Poll ``promql`` until ``predicate(result)``; fail naming ``what`` and the targets."""
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(promql)
            if predicate(result):
                return result
            time.sleep(0.2)
        raise AssertionError(
            f"Prometheus: {what} not seen within {timeout}s; last {promql} = {result}; "
            f"targets {json.dumps(self.targets())[:2000]}"
        )

    def stop(self) -> None:
        """SIGTERM, wait, close the log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    """The prometheus binary (``make prometheus-bin`` installs it); fails, never skips."""
    found = os.environ.get("KUBETUNE_PROMETHEUS") or shutil.which("prometheus")
    if not found:
        pytest.fail(INSTALL_HINT)
    return found


@pytest.fixture()
def prometheus(prometheus_bin: str, tmp_path: Path) -> Iterator[Callable[..., PrometheusServer]]:
    """Factory: start a Prometheus with ``scrape_configs``; stopped after the test."""
    started: list[PrometheusServer] = []

    def start(scrape_configs: list[dict[str, Any]]) -> PrometheusServer:
        server = PrometheusServer(
            prometheus_bin, tmp_path / f"prometheus-{len(started)}", scrape_configs
        )
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()
