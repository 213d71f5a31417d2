"""`kubetune operator` as a user runs it: a separate process, reading KUBECONFIG, reconciling a
FineTuneJob against kmock, and stopping cleanly on SIGINT.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tests.plugins.kube import wait_for_object

FTJ = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "cli", "namespace": "default"},
    "spec": {
        "baseModel": {"uri": "s3://models/base"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/cli"},
    },
}


async def test_kubetune_operator_command_reconciles_and_stops_on_sigint(kube, kube_api):
    env = {**os.environ, "KUBECONFIG": kube_api.kubeconfig}
    proc = subprocess.Popen(
        # (no --namespace: kmock cannot list /api/v1/namespaces, which Kopf does for namespace lists)
        [sys.executable, "-m", "kubetune.cli", "operator"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = ""
    try:
        await kube.create(FTJ)
        try:
            job = await wait_for_object(
                kube, "batch/v1", "Job", "default", "cli-validate", timeout=60
            )
        except AssertionError:
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=30)
            raise AssertionError(out[-4000:]) from None
        assert job["spec"]["template"]["spec"]["containers"][0]["command"][-1] == "validate"
        await wait_for_object(
            kube,
            "kubetune.io/v1alpha1",
            "FineTuneJob",
            "default",
            "cli",
            lambda o: (o.get("status") or {}).get("phase") == "Validating",
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode in (0, 130), out[-3000:]
