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

Each level runs in ``--rounds`` alternating rounds (ours then baseline, then baseline then
ours, ...): on a shared machine whose load drifts, measuring one side after the other let the
drift decide the ratio at concurrency 1. ``--profile`` runs concurrency 1 with cProfile on
both sides (the server's HTTP thread and batch worker, the baseline's ``generate``) and prints
where a request's time goes.

    .venv/bin/python bench/server_throughput.py [--hidden 256 --layers 4 --max-tokens 32]
        [--levels 1,4,16] [--rounds 4] [--profile] [--record]
"""

from __future__ import annotations

import argparse
import contextlib
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
    return {"wall": wall, "latencies": latencies, "tokens": tokens}


def summarise(parts: list[dict]) -> dict:
    """One level's figures from its rounds: tokens / summed wall time, latency percentiles."""
    latencies = [x for p in parts for x in p["latencies"]]
    tokens = sum(p["tokens"] for p in parts)
    return {
        "tokens_per_s": tokens / sum(p["wall"] for p in parts),
        "p50": statistics.median(latencies),
        "p95": percentile(latencies, 0.95),
        "requests": len(latencies),
        "tokens": tokens,
    }


def compare(ours, baseline, items: list[str], concurrency: int, rounds: int) -> tuple[dict, dict]:
    """Both sides on the same items, in alternating rounds (ours first, then baseline first).

    NB: this machine is shared; a load spike during one side's whole run would decide the
    ratio. Alternating rounds of ``concurrency`` requests spreads any drift over both sides.
    """
    size = max(concurrency, -(-len(items) // rounds))
    o_parts, b_parts = [], []
    for k, start in enumerate(range(0, len(items), size)):
        chunk = items[start : start + size]
        sides = [(ours, o_parts), (baseline, b_parts)]
        for fn, parts in sides if k % 2 == 0 else sides[::-1]:
            parts.append(run_level(fn, chunk, concurrency))
    return summarise(o_parts), summarise(b_parts)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Runs kubetune_server's main() with cProfile on the main (HTTP) thread and on the batch
# worker (cProfile sees one thread only), then writes both profiles where KT_BENCH_PROFILE says.
PROFILED_SERVER = """
import cProfile, os, sys
from kubetune_server import app, engine
out = os.environ["KT_BENCH_PROFILE"]
run = engine.Engine._run
def profiled(self):
    prof = cProfile.Profile()
    prof.enable()
    try:
        run(self)
    finally:
        prof.disable()
        prof.dump_stats(out + ".worker")
engine.Engine._run = profiled
# The HTTP thread only while a generation request is in flight (not start-up, not the
# /readyz polls that wait for the model under the loader thread's GIL).
main_prof = cProfile.Profile()
call = app.MetricsMiddleware.__call__
async def profiled_call(self, scope, receive, send):
    if scope["type"] != "http" or scope["method"] != "POST":
        return await call(self, scope, receive, send)
    main_prof.enable()
    try:
        return await call(self, scope, receive, send)
    finally:
        main_prof.disable()
app.MetricsMiddleware.__call__ = profiled_call
try:
    code = app.main()
finally:
    main_prof.dump_stats(out + ".main")
sys.exit(code)
"""


def start_server(
    model_dir: Path, threads: int, max_batch: int, cache: Path, profile: Path | None = None
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
    if profile is not None:
        env["KT_BENCH_PROFILE"] = str(profile)
    proc = subprocess.Popen(
        [sys.executable, "-c", PROFILED_SERVER]
        if profile is not None
        else [sys.executable, "-m", "kubetune_server"],
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


def _cum(stats, match) -> float:
    """Cumulative seconds of the functions ``match(file, line, name)`` selects (outermost calls)."""
    return sum(row[3] for (file, line, name), row in stats.stats.items() if match(file, line, name))


def where_the_time_goes(prof: Path, base_stats, requests: int, tokens: int) -> list[str]:
    """A table of where a request's time goes, ours (server threads) and the baseline's."""
    import pstats

    worker = pstats.Stats(str(prof) + ".worker")
    main_ = pstats.Stats(str(prof) + ".main")
    # Every nn.Module call (recursion counted once by pstats): the model's forward passes.
    is_model = lambda f, _, n: n == "_wrapped_call_impl" and f.endswith("module.py")  # noqa: E731
    forward = _cum(worker, is_model)
    generate = _cum(worker, lambda f, _, n: n == "generate" and f.endswith("engine.py"))
    handler = _cum(main_, lambda f, _, n: n == "_serve" and f.endswith("app.py"))
    # Everything the HTTP thread did while a request was in flight, less its idle epoll waits.
    busy = main_.total_tt - _cum(main_, lambda f, _, n: "select.epoll" in n)
    b_forward = _cum(base_stats, is_model)
    b_generate = _cum(base_stats, lambda f, _, n: n == "generate" and "generation/utils.py" in f)
    per = lambda x: f"{1000 * x / requests:.1f}"  # noqa: E731
    return [
        f"Profile of concurrency 1 ({requests} requests, {tokens // requests} tokens each), ms per request (cProfile adds overhead to both sides alike):",
        "",
        "| where | ours (kubetune_server) | baseline (`generate`) |",
        "|---|---|---|",
        f"| model forward passes | {per(forward)} | {per(b_forward)} |",
        f"| decoding loop around them (sampling, stop checks, KV-cache and mask bookkeeping) | {per(generate - forward)} | {per(b_generate - b_forward)} |",
        f"| HTTP thread: request handler `_serve` (validate, tokenise, queue, build the answer) | {per(handler)} | - |",
        f"| HTTP thread: the rest while the request is in flight (uvicorn, FastAPI, JSON, event loop; waiting for the GIL included) | {per(busy - handler)} | - |",
        "",
    ]


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
    parser.add_argument(
        "--levels",
        default=",".join(map(str, LEVELS)),
        help="comma-separated concurrency levels (default 1,4,16)",
    )
    parser.add_argument(
        "--rounds", type=int, default=4, help="alternating rounds per level (see compare())"
    )
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument(
        "--record", action="store_true", help="append the results to bench/RESULTS.md"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile both sides at concurrency 1 and print where a request's time goes",
    )
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",") if x.strip()]

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

    import cProfile

    base_prof = cProfile.Profile() if args.profile else None
    profile_path = work / "server.prof" if args.profile else None
    if args.profile:
        levels = [1]  # where the time goes at concurrency 1, the level in question

    def baseline(prompt: str) -> int:
        ids = tok(prompt, return_tensors="pt")["input_ids"].to(device)
        with gen_lock, torch.inference_mode(), base_prof or contextlib.nullcontext():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.max_tokens,
                min_new_tokens=args.max_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        return int(out.shape[1] - ids.shape[1])

    proc, url = start_server(model_dir, args.threads, max(LEVELS), work / "cache", profile_path)
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
        for level in levels:
            n = args.requests_per_level or max(8, 4 * level)
            items = prompts(n)
            o, b = compare(ours, baseline, items, level, args.rounds)
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
    if args.profile:
        import pstats

        served = sum(o["requests"] for _, o, _ in rows) + 2  # + the two warm-up requests
        tokens = served * args.max_tokens
        table += [""] + where_the_time_goes(profile_path, pstats.Stats(base_prof), served, tokens)
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
            "transformers `generate` per request, serialised, in-process (no HTTP). "
            f"{args.rounds} alternating rounds per level; load average {os.getloadavg()[0]:.1f} at the end"
            + (
                " (under cProfile: ratios not comparable to unprofiled runs)."
                if args.profile
                else "."
            ),
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
