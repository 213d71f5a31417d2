"""The batching engine in-process, over the tiny model (no HTTP, no threads unless stated).

Aspects covered:

- a left-padded batch produces exactly the greedy text of each prompt run alone, including
  rows that finish early and are cut out of the batch and its KV cache
- seeded sampling does not depend on the batch around a sequence
- stop strings: the text ends before the stop, streamed deltas add up to the final text
- EOS ends a sequence unless ignore_eos; max_tokens gives finish_reason "length"
- the queue: maxQueue refusal, batches grouped per adapter and capped at maxBatchSize,
  cancelled sequences never reach a batch; a lone request starts at once, a burst already
  queued waits (batchWaitMs) to fill the batch
- the worker thread serves submitted work and stops cleanly
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from kubetune_server.config import Settings
from kubetune_server.engine import Chunk, Engine, QueueFull, SamplingParams, Sequence


@pytest.fixture(scope="module")
def loaded(tiny_base_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny base model loaded the way the server loads it."""
    from kubetune_server import loading

    settings = Settings(
        model_uri=tiny_base_model.as_uri(), model_name="m", cache_dir=tmp_path_factory.mktemp("c")
    )
    return loading.load(settings)


def seq(loaded, prompt: str, adapter=None, **params) -> Sequence:
    """A sequence collecting its chunks in ``.chunks``."""
    chunks: list[Chunk] = []
    params.setdefault("temperature", 0.0)
    s = Sequence(
        loaded.tokenizer(prompt)["input_ids"], SamplingParams(**params), adapter, chunks.append
    )
    s.chunks = chunks  # type: ignore[attr-defined]
    return s


def text(s: Sequence) -> str:
    return "".join(c.text for c in s.chunks)


PROMPTS = [
    "Hi!",
    "What is the code word for zorb? Thanks.",
    "Hello there. Give the code word for vesh.",
    "x",
]


def test_batched_greedy_equals_each_prompt_alone(loaded):
    engine = Engine(loaded)
    alone = []
    for p in PROMPTS:
        s = seq(loaded, p, max_tokens=12, ignore_eos=True)
        engine.generate([s])
        alone.append(text(s))
    batch = [seq(loaded, p, max_tokens=12, ignore_eos=True) for p in PROMPTS]
    engine.generate(batch)
    assert [text(s) for s in batch] == alone
    assert all(s.finish_reason == "length" and len(s.generated) == 12 for s in batch)


def test_rows_that_finish_early_leave_the_others_unchanged(loaded):
    engine = Engine(loaded)
    lengths = [3, 15, 1, 9]
    alone = []
    for p, n in zip(PROMPTS, lengths, strict=True):
        s = seq(loaded, p, max_tokens=n, ignore_eos=True)
        engine.generate([s])
        alone.append(s.generated)
    batch = [
        seq(loaded, p, max_tokens=n, ignore_eos=True) for p, n in zip(PROMPTS, lengths, strict=True)
    ]
    engine.generate(batch)
    assert [s.generated for s in batch] == alone
    assert [len(s.generated) for s in batch] == lengths


def test_sequences_arriving_mid_batch_join_it_and_match_running_alone(loaded):
    engine = Engine(loaded, max_batch_size=4, batch_wait_ms=0)
    specs = [
        ("Hi!", 20),
        ("What is the code word for zorb? Thanks.", 6),
        ("x", 9),
        ("Hello there.", 3),
    ]
    alone = []
    for prompt, n in specs:
        s = seq(loaded, prompt, max_tokens=n, ignore_eos=True)
        engine.generate([s])
        alone.append(s.generated)
    sizes: list[int] = []
    engine = Engine(loaded, max_batch_size=4, batch_wait_ms=0, on_batch=sizes.append)
    running = seq(loaded, specs[0][0], max_tokens=specs[0][1], ignore_eos=True)
    # Queued while `running` is generating: the worker would pick them up between two steps.
    joiners = [seq(loaded, p, max_tokens=n, ignore_eos=True) for p, n in specs[1:]]
    engine.submit(joiners)
    engine.generate([running])
    assert sizes == [4]  # one batch of (at most) 4 rows: the others joined it
    assert engine.queue_depth == 0
    assert [s.generated for s in [running, *joiners]] == alone


def test_seeded_sampling_is_independent_of_the_batch(loaded):
    engine = Engine(loaded)
    alone = seq(loaded, "Hello", max_tokens=10, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    engine.generate([alone])
    batch = [
        seq(loaded, p, max_tokens=10, temperature=1.0, seed=i, ignore_eos=True)
        for i, p in enumerate(PROMPTS)
    ]
    mate = seq(loaded, "Hello", max_tokens=10, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    engine.generate([*batch, mate])
    assert mate.generated == alone.generated
    other = seq(loaded, "Hello", max_tokens=10, temperature=1.0, top_p=0.9, seed=8, ignore_eos=True)
    engine.generate([other])
    assert other.generated != alone.generated


def test_stop_string_ends_the_text_before_it_and_deltas_add_up(loaded):
    engine = Engine(loaded)
    full = seq(loaded, "Hi!", max_tokens=20, ignore_eos=True)
    engine.generate([full])
    whole = text(full)
    stop = whole[5:8]
    cut = seq(loaded, "Hi!", max_tokens=20, ignore_eos=True, stop=(stop, "never-appears"))
    engine.generate([cut])
    assert text(cut) == whole[: whole.find(stop)]
    assert cut.finish_reason == "stop"
    assert cut.chunks[-1].finish_reason == "stop"
    assert all(c.finish_reason is None for c in cut.chunks[:-1])


def test_non_streamed_sequences_emit_their_text_once_at_the_end(loaded):
    engine = Engine(loaded)
    streamed = seq(loaded, "Hi!", max_tokens=10, ignore_eos=True)
    quiet = seq(loaded, "Hi!", max_tokens=10, ignore_eos=True)
    quiet.stream = False
    engine.generate([streamed, quiet])
    assert len(quiet.chunks) == 1
    assert quiet.chunks[0].finish_reason == "length"
    assert text(quiet) == text(streamed)
    assert len(streamed.chunks) > 1


def test_eos_stops_unless_ignored(loaded):
    engine = Engine(loaded)
    eos = loaded.eos_token_ids[0]
    s = seq(loaded, "Hi", max_tokens=5)
    assert not engine._advance(s, 5)
    assert engine._advance(s, eos)
    assert s.finish_reason == "stop"
    t = seq(loaded, "Hi", max_tokens=2, ignore_eos=True)
    assert not engine._advance(t, eos)
    assert engine._advance(t, 5)
    assert t.finish_reason == "length"


def test_queue_refuses_beyond_max_queue(loaded):
    engine = Engine(loaded, max_queue=2)
    engine.submit([seq(loaded, "a", max_tokens=1)])
    with pytest.raises(QueueFull):
        engine.submit([seq(loaded, "b", max_tokens=1), seq(loaded, "c", max_tokens=1)])
    engine.submit([seq(loaded, "d", max_tokens=1)])
    assert engine.queue_depth == 2


def test_batches_group_one_adapter_and_respect_max_batch_size(loaded):
    engine = Engine(loaded, max_batch_size=2, batch_wait_ms=0, max_queue=10)
    a1, b1, a2, a3 = (seq(loaded, "p", adapter=x, max_tokens=1) for x in ("a", "b", "a", "a"))
    engine.submit([a1, b1, a2, a3])
    assert engine._next_batch() == [a1, a2]
    assert engine._next_batch() == [b1]
    assert engine._next_batch() == [a3]


def test_a_lone_request_does_not_wait_batch_wait_ms_for_company(loaded):
    """Bug (issue 13, bench/server_throughput.py at concurrency 1): every request paid
    batchWaitMs on an idle server; later arrivals join the running batch instead."""
    engine = Engine(loaded, batch_wait_ms=3_600_000)  # an hour: the old code would block here
    lone = seq(loaded, "p", max_tokens=1)
    engine.submit([lone])
    got: list = []
    worker = threading.Thread(target=lambda: got.append(engine._next_batch()), daemon=True)
    worker.start()
    worker.join(120)
    assert got == [[lone]]


def test_a_burst_already_queued_still_waits_to_fill_the_batch(loaded):
    engine = Engine(loaded, max_batch_size=3, batch_wait_ms=3_600_000)
    first, second, third = (seq(loaded, p, max_tokens=1) for p in "pqr")
    engine.submit([first, second])
    got: list = []
    worker = threading.Thread(target=lambda: got.append(engine._next_batch()), daemon=True)
    worker.start()
    engine.submit([third])  # arrives while the batcher waits: fills the batch, ends the wait
    worker.join(120)
    assert got == [[first, second, third]]


def test_cancelled_sequences_never_reach_a_batch(loaded):
    engine = Engine(loaded, batch_wait_ms=0)
    gone, kept = seq(loaded, "p", max_tokens=1), seq(loaded, "q", max_tokens=1)
    engine.submit([gone, kept])
    gone.cancel()
    assert engine._next_batch() == [kept]


def test_worker_thread_serves_submissions_and_stops(loaded):
    sizes: list[int] = []
    engine = Engine(loaded, max_batch_size=4, batch_wait_ms=50, on_batch=sizes.append)
    done = threading.Event()
    results: list[Chunk] = []

    def emit(chunk: Chunk) -> None:
        results.append(chunk)
        if sum(1 for c in results if c.finish_reason) == 3:
            done.set()

    seqs = [
        Sequence(
            loaded.tokenizer(p)["input_ids"],
            SamplingParams(max_tokens=4, temperature=0),
            None,
            emit,
        )
        for p in PROMPTS[:3]
    ]
    engine.submit(seqs)  # queued before the worker starts: one batch of three
    engine.start()
    assert done.wait(60)
    engine.stop(10)
    assert sizes == [3]
    assert not engine._thread.is_alive()
