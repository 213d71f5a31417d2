"""Helpers for the server tests: run ``python -m kubetune_server`` as a real process on loopback.

- :class:`ServerProcess` / :func:`start_server`: a subprocess with the given environment on a
  free port; ``wait_ready()`` polls ``/readyz``; ``url``; ``log()`` returns its output so a
  failing test shows why the server did not come up.
- :func:`train_adapter`: a LoRA adapter over the tiny base that has actually learnt the
  synthetic code-word task (the recipe of tests/unit/test_trainer_synthetic.py, ~10 s on CPU),
  saved with ``save_pretrained`` plus a kubetune ``manifest.json``.
- :func:`metric_value` / :func:`histogram_count`: read one figure out of a /metrics text.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from kubetune.rollout.analysis import parse_exposition
from kubetune_trainer import synthetic

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A loopback TCP port that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A running ``python -m kubetune_server``."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full = {k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_")}
        full.update(
            {
                "KUBETUNE_PORT": str(self.port),
                "KUBETUNE_HOST": "127.0.0.1",
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join([str(ROOT), full.get("PYTHONPATH", "")]).rstrip(
                    os.pathsep
                ),
            }
        )
        full.update(env)
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune_server"],
            env=full,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Poll /readyz until 200; fail with the server's log when it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.log()}")

    def metrics(self) -> str:
        """The /metrics text."""
        return httpx.get(f"{self.url}/metrics", timeout=5).text

    def stop(self) -> int | None:
        """SIGTERM, wait, close the log; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def start_server(tmp_path: Path, **env: str) -> ServerProcess:
    """Start a server with ``env`` (KUBETUNE_* names) and a cache under ``tmp_path``."""
    env.setdefault("KUBETUNE_CACHE_DIR", str(tmp_path / "cache"))
    return ServerProcess(env, tmp_path / f"server-{free_port()}.log")


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        s.value
        for s in parse_exposition(text)
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def histogram_buckets(text: str, name: str) -> dict[float, float]:
    """Cumulative counts by upper bound of histogram ``name`` (all label sets summed)."""
    out: dict[float, float] = {}
    for s in parse_exposition(text):
        if s.name == f"{name}_bucket":
            le = float(s.labels["le"])
            out[le] = out.get(le, 0.0) + s.value
    return out


def train_adapter(
    base: Path, out: Path, steps: int = 160, seed: int = 0, variant: str = "a", lr: float = 3e-3
) -> Path:
    """Train a LoRA adapter on the code-word task and save it (adapter files + manifest)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune.storage.manifests import write_manifest

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    # NB: one thread: the test machine is shared with the servers under test, and torch's
    # default (all cores) oversubscribes it and runs ~10x slower than single-threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        data = []
        for ex in synthetic.task_examples(400, seed=1, variant=variant):
            user = [{"role": "user", "content": ex["prompt"]}]
            pre = tok.apply_chat_template(user, add_generation_prompt=True, return_dict=True)[
                "input_ids"
            ]
            full = tok.apply_chat_template(
                user + [{"role": "assistant", "content": ex["answer"]}], return_dict=True
            )["input_ids"]
            data.append((full, [-100] * len(pre) + full[len(pre) :]))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        for step in range(steps):
            batch = [data[(step * 16 + i) % len(data)] for i in range(16)]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i, _ in batch])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
            loss = model(
                input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels
            ).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    torch.set_num_threads(threads)
    model.save_pretrained(out)
    write_manifest(out, {"kind": "adapter"})
    return out


def random_adapter(base: Path, out: Path, seed: int = 0) -> Path:
    """An untrained LoRA adapter with random (non-zero) weights, saved with a manifest.

    ``init_lora_weights=False`` initialises both LoRA matrices randomly, so the adapter does
    change the model's output (peft's default makes a fresh adapter an exact no-op).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from kubetune.storage.manifests import write_manifest

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
        )
    model.save_pretrained(out)
    write_manifest(out, {"kind": "adapter"})
    return out


class ThreadServer:
    """The server app under uvicorn in a thread of the test process (no new interpreter).

    Much cheaper than a subprocess when torch is already imported; the app still loads its
    model in the background and serves over a real loopback socket.
    """

    def __init__(self, settings):
        import threading

        import uvicorn

        from kubetune_server.app import ServerState, create_app

        self.port = settings.port
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = ServerState(settings)
        config = uvicorn.Config(
            create_app(settings, self.state), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll /readyz until 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state.load_error:
                raise AssertionError(f"load failed: {self.state.load_error}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"not ready after {timeout}s")

    def metrics(self) -> str:
        """The /metrics text."""
        return httpx.get(f"{self.url}/metrics", timeout=5).text

    def stop(self) -> None:
        """Graceful uvicorn shutdown, then join."""
        self.server.should_exit = True
        self.thread.join(30)
