"""Benchmark: kubetune_server (dynamic batching + KV cache) vs one ``generate`` per request.

Both sides serve the same requests (the same prompts, ``max_tokens`` fixed, EOS ignored so that
every request generates exactly that many tokens) from ``concurrency`` client threads at a
time, at each of the concurrency levels 1, 4 and 16:

- **ours**: ``python -m kubetune_server`` as a real process on loopback, requests over HTTP
  through httpx (``/v1/completions``); latency is measured by the client (queueing, HTTP and
  JSON included).
- **baseline**: in this process, one transformers ``model.generate`` call per request, one at
  a time (a lock serialises the client threads, which is what a server without batching does);
  latency includes the wait for the lock.

Generated tokens per second (all requests' completion tokens / wall time of the level) and
p50/p95 request latency are printed for both, with the ratio ours/baseline; ``--record``
appends the table to bench/RESULTS.md. Both sides get the same number of torch threads.

    .venv/bin/python bench/server_throughput.py [--hidden 256 --layers 4 --max-tokens 32] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [
    str(ROOT / "operator"),
    str(ROOT / "trainer-image"),
    str(ROOT / "server-image"),
    str(ROOT),
]

import httpx  # noqa: E402

from kubetune_trainer import synthetic  # noqa: E402

LEVELS = (1, 4, 16)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def prompts(n: int) -> list[str]:
    return [ex["prompt"] for ex in synthetic.task_examples(n, seed=11)]


def run_level(fn, items: list[str], concurrency: int) -> dict:
    """Send ``items`` through ``fn`` from ``concurrency`` threads; tokens/s and latencies."""
    latencies: list[float] = []
    tokens = 0
    lock = threading.Lock()

    def one(prompt: str) -> None:
        nonlocal tokens
        started = time.perf_counter()
        n = fn(prompt)
        elapsed = time.perf_counter() - started
        with lock:
            latencies.append(elapsed)
            tokens += n

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, items))
    wall = time.perf_counter() - started
    return {
        "tokens_per_s": tokens / wall,
        "p50": statistics.median(latencies),
        "p95": percentile(latencies, 0.95),
        "requests": len(items),
        "tokens": tokens,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    model_dir: Path, threads: int, max_batch: int, cache: Path
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_")}
    env.update(
        {
            "KUBETUNE_MODEL_URI": model_dir.resolve().as_uri(),
            "KUBETUNE_MODEL_NAME": "bench",
            "KUBETUNE_PORT": str(port),
            "KUBETUNE_HOST": "127.0.0.1",
            "KUBETUNE_CACHE_DIR": str(cache),
            "KUBETUNE_SERVER_CONFIG": json.dumps(
                {
                    "maxBatchSize": max_batch,
                    "batchWaitMs": 5,
                    "maxQueue": 1024,
                    "maxTokensLimit": 512,
                }
            ),
            "OMP_NUM_THREADS": str(threads),
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT / "operator"), str(ROOT / "trainer-image"), str(ROOT / "server-image")]
            ),
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetune_server"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"server exited: {proc.stderr.read().decode(errors='replace')[-3000:]}"
            )
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become ready in 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--hidden", type=int, default=256, help="hidden size of the synthetic model"
    )
    parser.add_argument(
        "--layers", type=int, default=4, help="decoder layers of the synthetic model"
    )
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument(
        "--requests-per-level", type=int, default=0, help="default: 4 x concurrency, at least 8"
    )
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument(
        "--record", action="store_true", help="append the results to bench/RESULTS.md"
    )
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="kt-bench-"))
    model_dir = synthetic.build_base_model(
        work / "model",
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=max(4, args.hidden // 64),
        num_kv_heads=max(2, args.hidden // 128),
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    gen_lock = threading.Lock()

    def baseline(prompt: str) -> int:
        ids = tok(prompt, return_tensors="pt")["input_ids"].to(device)
        with gen_lock, torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.max_tokens,
                min_new_tokens=args.max_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        return int(out.shape[1] - ids.shape[1])

    proc, url = start_server(model_dir, args.threads, max(LEVELS), work / "cache")
    client = httpx.Client(
        timeout=600, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64)
    )

    def ours(prompt: str) -> int:
        resp = client.post(
            f"{url}/v1/completions",
            json={
                "model": "bench",
                "prompt": prompt,
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            },
        )
        resp.raise_for_status()
        return resp.json()["usage"]["completion_tokens"]

    rows = []
    try:
        # Warm both sides up (first-call allocations, thread pools) outside the timings.
        run_level(baseline, prompts(2), 1)
        run_level(ours, prompts(2), 2)
        for level in LEVELS:
            n = args.requests_per_level or max(8, 4 * level)
            items = prompts(n)
            b = run_level(baseline, items, level)
            o = run_level(ours, items, level)
            rows.append((level, o, b))
            print(
                f"c={level:>2}  ours {o['tokens_per_s']:8.1f} tok/s p50 {o['p50']:.3f}s p95 {o['p95']:.3f}s | "
                f"baseline {b['tokens_per_s']:8.1f} tok/s p50 {b['p50']:.3f}s p95 {b['p95']:.3f}s | "
                f"ratio {o['tokens_per_s'] / b['tokens_per_s']:.2f}x",
                flush=True,
            )
    finally:
        client.close()
        proc.terminate()
        proc.wait(60)

    machine = f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, {device}"
    if device == "cuda":
        machine += f" ({torch.cuda.get_device_name(0)})"
    table = [
        "| concurrency | requests | ours tok/s | ours p50 s | ours p95 s | baseline tok/s | baseline p50 s | baseline p95 s | tok/s ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for level, o, b in rows:
        table.append(
            f"| {level} | {o['requests']} | {o['tokens_per_s']:.1f} | {o['p50']:.3f} | {o['p95']:.3f} | "
            f"{b['tokens_per_s']:.1f} | {b['p50']:.3f} | {b['p95']:.3f} | {o['tokens_per_s'] / b['tokens_per_s']:.2f}x |"
        )
    print("\n".join(table))
    if args.record:
        cmd = "python bench/server_throughput.py " + " ".join(sys.argv[1:])
        section = [
            "",
            f"## server_throughput ({datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')})",
            "",
            f"Machine: {machine}; torch threads {args.threads} on both sides. Model: synthetic Llama "
            f"hidden {args.hidden}, {args.layers} layers; {args.max_tokens} tokens per request (EOS ignored). "
            "Ours: kubetune_server over HTTP on loopback (maxBatchSize 16, batchWaitMs 5); baseline: one "
            "transformers `generate` per request, serialised, in-process (no HTTP).",
            "",
            f"Command: `{cmd.strip()}`",
            "",
            *table,
            "",
        ]
        results = ROOT / "bench" / "RESULTS.md"
        existing = results.read_text() if results.exists() else "# Benchmark results\n"
        results.write_text(existing.rstrip("\n") + "\n" + "\n".join(section))
        print(f"recorded in {results}")


if __name__ == "__main__":
    main()
