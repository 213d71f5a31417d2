"""The batching engine: a bounded queue and one worker thread that generates whole batches.

Requests (one :class:`Sequence` per choice) wait in a FIFO queue of at most ``maxQueue``
entries; :meth:`Engine.submit` refuses more with :class:`QueueFull` (the API answers 429). The
worker takes the oldest sequence and every later one for the same adapter, up to
``maxBatchSize`` and a token budget; when two or more are queued it waits at most
``batchWaitMs`` after the oldest one arrived for the batch to fill (dynamic batching, as TGI's
``max_waiting_tokens``), while a lone sequence starts at once; sequences
that arrive while a batch runs join it between two decode steps (continuous batching, see
:meth:`Engine.generate`). A batch runs as one left-padded forward pass over all prompts
(prefill), then one forward pass per new token for all rows together, reusing a KV cache. Every row keeps its own sampling settings
(temperature, top_p, its own seeded ``torch.Generator``: a seed gives the same text whatever
the batch around it), stop strings and ``max_tokens``; a row that finishes or whose client went
away is cut out of the batch and its KV cache, so the rest does not drag it along.

Why one thread: a model forward pass cannot be shared between threads anyway, and the
asyncio event loop must stay free for HTTP (health checks, /metrics) while the GPU/CPU works.
The worker hands results back through ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("kubetune_server.engine")

GREEDY_BELOW = 1e-5


class QueueFull(Exception):
    """The queue already holds ``maxQueue`` sequences."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no new work."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-sequence generation settings (already validated by the API)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    #: Log-probabilities wanted: None = none, k >= 0 = the chosen token's and the top k.
    logprobs: int | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the ``top`` most likely alternatives.

    Log-probabilities of the model's distribution for that position (log-softmax of the raw
    logits, before temperature and top_p), as OpenAI and vLLM report them: they do not depend
    on the sampling settings, and under greedy decoding the chosen token is the top one.
    """

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Chunk:
    """What the worker reports for a sequence: new text, and the finish reason at the end."""

    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0
    error: str | None = None
    #: Log-probabilities of the tokens generated since the previous chunk (when asked for).
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(eq=False)
class Sequence:
    """One generated choice: prompt tokens, settings, adapter, and where results go."""

    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None
    emit: Callable[[Chunk], None]
    arrival: float = field(default_factory=time.monotonic)
    #: Whether the client reads text as it comes (False: only the final text is emitted).
    stream: bool = True
    cancelled: bool = False
    first_token_at: float | None = None
    last_token_at: float | None = None
    # Worker-side state.
    generated: list[int] = field(default_factory=list)
    emitted: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    #: How many of ``logprobs`` went out in chunks already.
    logprobs_emitted: int = 0

    def cancel(self) -> None:
        """Stop generating (client gone, timeout); the worker drops the row at its next step."""
        self.cancelled = True


class Engine:
    """Queue + batch worker over a loaded model (see the module docstring)."""

    def __init__(
        self,
        loaded: Any,
        *,
        max_batch_size: int = 8,
        batch_wait_ms: float = 10,
        max_queue: int = 64,
        max_batch_tokens: int = 32768,
        on_batch: Callable[[int], None] | None = None,
        on_queue: Callable[[int], None] | None = None,
        step_delay_ms: float = 0.0,
    ):
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait_ms / 1000.0
        self.max_queue = max_queue
        self.max_batch_tokens = max_batch_tokens
        # Fault injection (KUBETUNE_FAULT_TOKEN_LATENCY_MS): a pause after every decode step.
        self.step_delay = step_delay_ms / 1000.0
        self._on_batch = on_batch or (lambda n: None)
        self._on_queue = on_queue or (lambda n: None)
        self._pending: deque[Sequence] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._active: list[Sequence] = []
        self._peak = 0
        self.running = 0

    # --- queue --------------------------------------------------------------------------

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue the sequences of one request together (all or none)."""
        with self._cond:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._pending) + len(seqs) > self.max_queue:
                raise QueueFull(
                    f"{len(self._pending)} requests are queued (maxQueue {self.max_queue})"
                )
            self._pending.extend(seqs)
            self._on_queue(len(self._pending))
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        """Sequences waiting for a batch."""
        return len(self._pending)

    def start(self) -> None:
        """Start the worker thread."""
        self._thread = threading.Thread(target=self._run, name="kubetune-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued and running, then stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _next_batch(self) -> list[Sequence] | None:
        """Block until a batch is ready (see module docstring); None once stopped and empty."""
        with self._cond:
            while True:
                while self._pending and self._pending[0].cancelled:
                    self._pending.popleft()
                if self._pending:
                    break
                if self._stopping:
                    return None
                self._cond.wait()
            first = self._pending[0]
            deadline = first.arrival + self.batch_wait
            while True:
                batch = self._select(first.adapter)
                now = time.monotonic()
                if len(batch) >= self.max_batch_size or now >= deadline or self._stopping:
                    break
                # NB: a lone sequence starts at once. Waiting batchWaitMs for company was the
                # one fixed cost a request paid at concurrency 1 (bench/RESULTS.md, profile of
                # server_throughput); a request that arrives a moment later joins the running
                # batch at its next decode step (continuous batching), so nothing is lost.
                # The wait still gathers a burst that is already arriving (two or more queued).
                if len(self._pending) == 1:
                    break
                # Woken early by every submit: re-select, the batch may be full now.
                self._cond.wait(deadline - now)
            chosen = set(map(id, batch))
            self._pending = deque(
                s for s in self._pending if id(s) not in chosen and not s.cancelled
            )
            self._on_queue(len(self._pending))
            return batch

    def _select(self, adapter: str | None, limit: int | None = None) -> list[Sequence]:
        """The oldest sequences for ``adapter`` within ``limit`` (maxBatchSize) and the token budget."""
        limit = limit or self.max_batch_size
        batch: list[Sequence] = []
        budget = 0
        for seq in self._pending:
            if seq.cancelled or seq.adapter != adapter:
                continue
            cost = len(seq.prompt_ids) + seq.params.max_tokens
            if batch and budget + cost > self.max_batch_tokens:
                break
            batch.append(seq)
            budget += cost
            if len(batch) >= limit:
                break
        return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self.running = len(batch)
            try:
                self.generate(batch)
            except Exception as exc:  # never kill the worker: fail this batch, serve the next
                log.exception("batch of %d failed", len(batch))
                for seq in self._active or batch:
                    if seq.finish_reason is None:
                        seq.finish_reason = "error"
                        seq.emit(Chunk(error=f"generation failed: {exc}"))
            finally:
                self.running = 0
                self._active = []

    # --- generation ---------------------------------------------------------------------

    def generate(self, batch: list[Sequence]) -> None:
        """Generate every sequence of ``batch`` to its end in shared forward passes.

        Continuous batching: between two decode steps, sequences for the same adapter that
        arrived meanwhile join the running batch (up to maxBatchSize rows): they are prefilled
        on their own, their KV cache is left-padded to the batch's length and stacked onto it,
        so a request arriving mid-batch starts within one step instead of waiting for the
        whole batch to finish.

        The batch-size metric (``on_batch``) gets the most rows decoded together in this
        batch, joiners included, when the batch ends.
        """
        # NB: a list of its own, published so that a failure also reaches the joiners.
        batch = self._active = list(batch)
        self._peak = len(batch)
        try:
            self._decode(batch)
        finally:
            self._on_batch(self._peak)

    def _decode(self, batch: list[Sequence]) -> None:
        """The prefill + decode loop of :meth:`generate` (``batch`` grows as sequences join)."""
        import torch

        device = self.loaded.device
        adapter = batch[0].adapter
        with torch.inference_mode(), self._adapter(adapter):
            gens = [self._generator(seq, device) for seq in batch]
            cache, mask, last_pos, logits = self._prefill(batch)
            rows = list(range(len(batch)))  # batch index of each live row
            while True:
                tokens = self._sample(logits, [batch[i] for i in rows], [gens[i] for i in rows])
                keep = self._step(batch, rows, tokens, logits)
                rows, next_ids = [rows[j] for j in keep], [tokens[j] for j in keep]
                if len(keep) < len(tokens) and keep:
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    mask, last_pos = mask[index], last_pos[index]
                room = self.max_batch_size - len(rows)
                joiners = self._admit(adapter, room) if self._can_join(cache) else []
                if joiners:
                    first = len(batch)
                    batch.extend(joiners)
                    gens.extend(self._generator(seq, device) for seq in joiners)
                    j_cache, j_mask, j_pos, j_logits = self._prefill(joiners)
                    j_tokens = self._sample(j_logits, joiners, gens[first:])
                    j_keep = self._step(batch, list(range(first, len(batch))), j_tokens, j_logits)
                    if j_keep:
                        if len(j_keep) < len(joiners):
                            index = torch.tensor(j_keep, device=device)
                            j_cache.batch_select_indices(index)
                            j_mask, j_pos = j_mask[index], j_pos[index]
                        if rows:
                            cache, mask = _stack_caches(cache, mask, j_cache, j_mask)
                            last_pos = torch.cat([last_pos, j_pos])
                        else:
                            cache, mask, last_pos = j_cache, j_mask, j_pos
                        rows += [first + j for j in j_keep]
                        next_ids += [j_tokens[j] for j in j_keep]
                    self._peak = max(self._peak, len(rows) + len(joiners) - len(j_keep))
                if not rows:
                    return
                if self.step_delay:
                    time.sleep(self.step_delay)
                mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
                last_pos = last_pos + 1
                out = self.loaded.model(
                    input_ids=torch.tensor(next_ids, device=device)[:, None],
                    attention_mask=mask,
                    position_ids=last_pos[:, None],
                    past_key_values=cache,
                    use_cache=True,
                )
                logits = out.logits[:, -1, :].float()

    def _prefill(self, seqs: list[Sequence]):
        """One left-padded forward pass over the prompts: (cache, mask, last positions, logits)."""
        import torch
        from transformers import DynamicCache

        loaded = self.loaded
        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), width), loaded.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            # Left padding: every row's last prompt token sits in the last column, so the next
            # token of every row is predicted from the same position of the output.
            ids[row, width - len(seq.prompt_ids) :] = torch.tensor(seq.prompt_ids)
            mask[row, width - len(seq.prompt_ids) :] = 1
        ids, mask = ids.to(loaded.device), mask.to(loaded.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=loaded.model.config)
        out = loaded.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return cache, mask, positions[:, -1], out.logits[:, -1, :].float()

    def _step(
        self, batch: list[Sequence], rows: list[int], tokens: list[int], logits=None
    ) -> list[int]:
        """Advance each row by its token; the positions (in ``rows``) of those still running."""
        keep: list[int] = []
        now = time.monotonic()
        if logits is not None:
            _record_logprobs(logits, [batch[i] for i in rows], tokens)
        for j, i in enumerate(rows):
            seq = batch[i]
            if seq.first_token_at is None:
                seq.first_token_at = now
            seq.last_token_at = now
            if not self._advance(seq, tokens[j]):
                keep.append(j)
        return keep

    def _admit(self, adapter: str | None, room: int) -> list[Sequence]:
        """Take up to ``room`` queued sequences for ``adapter`` without waiting."""
        if room <= 0 or not self._pending:
            return []
        with self._cond:
            joiners = self._select(adapter, room)
            if joiners:
                chosen = set(map(id, joiners))
                self._pending = deque(s for s in self._pending if id(s) not in chosen)
                self._on_queue(len(self._pending))
        return joiners

    @staticmethod
    def _can_join(cache) -> bool:
        """Joining needs plain growing per-layer tensors (not sliding-window or quantised caches)."""
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))

    def _adapter(self, adapter: str | None):
        """Select the batch's adapter on a PeftModel (or disable adapters for the bare base)."""
        model = self.loaded.model
        if not hasattr(model, "peft_config"):
            return contextlib.nullcontext()
        if adapter is None:
            return model.disable_adapter()
        model.set_adapter(adapter)
        return contextlib.nullcontext()

    @staticmethod
    def _generator(seq: Sequence, device: str):
        import torch

        if seq.params.temperature < GREEDY_BELOW:
            return None
        gen = torch.Generator(device=device)
        gen.manual_seed(seq.params.seed if seq.params.seed is not None else random.getrandbits(63))
        return gen

    @staticmethod
    def _sample(logits, seqs: list[Sequence], gens: list) -> list[int]:
        """Next token per row: argmax for greedy rows, temperature + nucleus sampling otherwise."""
        import torch

        tokens = logits.argmax(dim=-1).tolist()
        for j, (seq, gen) in enumerate(zip(seqs, gens, strict=True)):
            if gen is None:
                continue
            probs = torch.softmax(logits[j] / seq.params.temperature, dim=-1)
            if seq.params.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                cumulative = sorted_probs.cumsum(-1)
                # Keep the smallest prefix whose mass reaches top_p (always at least one token).
                sorted_probs[(cumulative - sorted_probs) > seq.params.top_p] = 0.0
                pick = torch.multinomial(sorted_probs, 1, generator=gen)
                tokens[j] = int(order[pick])
            else:
                tokens[j] = int(torch.multinomial(probs, 1, generator=gen))
        return tokens

    def _advance(self, seq: Sequence, token: int) -> bool:
        """Append ``token`` to ``seq``, emit new text; True when the sequence is finished."""
        if seq.cancelled:
            seq.finish_reason = "cancelled"
            return True
        params = seq.params
        seq.generated.append(token)
        finish = None
        if token in self.loaded.eos_token_ids and not params.ignore_eos:
            finish = "stop"
        elif len(seq.generated) >= params.max_tokens:
            finish = "length"
        if finish is None and not seq.stream and not params.stop:
            # Nobody reads partial text of a non-streamed answer without stop strings: skip the
            # per-token decode and the cross-thread wake-up, emit everything at the end.
            return False
        text = self.loaded.tokenizer.decode(seq.generated, skip_special_tokens=True)
        if params.stop:
            cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
        if finish is None:
            # Hold back what could still become a stop string, and half a UTF-8 character.
            safe = len(text) - (max(map(len, params.stop)) - 1 if params.stop else 0)
            if text.endswith("\ufffd"):
                safe = min(safe, len(text) - 1)
        else:
            safe = len(text)
        if safe > seq.emitted or finish:
            delta = text[seq.emitted : safe] if safe > seq.emitted else ""
            seq.emitted = max(seq.emitted, safe)
            seq.finish_reason = finish
            # The tokens generated since the last chunk go with its text (held-back text holds
            # back its tokens' log-probabilities too, so they arrive with the text they make).
            logprobs = tuple(seq.logprobs[seq.logprobs_emitted :])
            seq.logprobs_emitted = len(seq.logprobs)
            seq.emit(
                Chunk(
                    text=delta,
                    finish_reason=finish,
                    tokens=len(seq.generated),
                    logprobs=logprobs,
                )
            )
        return finish is not None


def _record_logprobs(logits, seqs: list[Sequence], tokens: list[int]) -> None:
    """Append each asking row's :class:`TokenLogprob` for its chosen token (one softmax per batch)."""
    wanted = [j for j, seq in enumerate(seqs) if seq.params.logprobs is not None]
    if not wanted:
        return
    import torch

    index = torch.tensor(wanted, device=logits.device)
    logp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    chosen = logp.gather(1, torch.tensor([[tokens[j]] for j in wanted], device=logits.device))
    k = max(seqs[j].params.logprobs or 0 for j in wanted)
    top_vals, top_ids = logp.topk(k, dim=-1) if k else (None, None)
    chosen = chosen[:, 0].tolist()
    top_vals = top_vals.tolist() if k else None
    top_ids = top_ids.tolist() if k else None
    for r, j in enumerate(wanted):
        n = seqs[j].params.logprobs or 0
        top = tuple(zip(top_ids[r][:n], top_vals[r][:n], strict=True)) if n else ()
        seqs[j].logprobs.append(TokenLogprob(tokens[j], chosen[r], top))


def _stack_caches(cache, mask, other, other_mask):
    """Stack ``other``'s rows under ``cache``'s, left-padding the shorter one (masked out)."""
    import torch
    import torch.nn.functional as F

    width = max(mask.shape[1], other_mask.shape[1])

    def pad(t, extra: int):
        # (B, heads, T, dim): pad T on the left.
        return F.pad(t, (0, 0, extra, 0)) if extra else t

    a, b = width - mask.shape[1], width - other_mask.shape[1]
    for mine, theirs in zip(cache.layers, other.layers, strict=True):
        mine.keys = torch.cat([pad(mine.keys, a), pad(theirs.keys, b)])
        mine.values = torch.cat([pad(mine.values, a), pad(theirs.values, b)])
    mask = torch.cat([F.pad(mask, (a, 0)), F.pad(other_mask, (b, 0))])
    return cache, mask
