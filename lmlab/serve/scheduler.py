"""Continuous batching: one decoding loop for every sequence the server has in flight.

    sched = Scheduler(model, tokenizer, max_batch=16, max_queue=64, max_len=1024)
    sched.start()
    seq = Sequence(prompt_ids, Sampling(max_new_tokens=64), stops, on_event=print)
    sched.submit(seq)           # QueueFull when max_queue sequences already wait
    sched.cancel(seq)           # e.g. the client went away: its slot is freed at the next step
    sched.close()

A thread owns the model. Each turn of its loop it admits waiting sequences while fewer than
`max_batch` decode (their prompts prefilled together, left-padded, in a cache of their own
that is then merged into the decoding batch: `cache.merge`), then decodes one token for every
active sequence at once, and drops the finished and cancelled ones (`cache.select`). A
sequence therefore never waits for another to finish, and a long prompt costs the others one
prefill, not a whole generation.

Every sequence samples with its own settings and its own seeded `torch.Generator`, and the
caches keep each row computing what it would alone, so a greedy (or seeded) request gives the
same text alone or among 16 others. Text reaches the caller through `on_event(Event)`, called
on the scheduler's thread: the pieces safe to show (never part of a stop string:
lmlab.infer.prompting's StopStream), then one event with the finish reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from lmlab.infer.prompting import Stops, StopStream
from lmlab.infer.sampling import Sampling, sample_next

log = logging.getLogger("lmlab.serve")


class QueueFull(Exception):
    """The waiting queue holds max_queue sequences already."""


@dataclass
class Event:
    text: str = ""                        # text to append (may be "" on the final event)
    finish_reason: Optional[str] = None   # "stop" | "length" | "cancelled" | "error" on the last event
    error: Optional[str] = None           # what went wrong, with finish_reason "error"


@dataclass(eq=False)
class Sequence:
    """One completion being generated: its prompt, settings, and where its text goes."""
    prompt: list[int]
    sampling: Sampling
    stops: Stops = Stops()
    on_event: Callable[[Event], None] = lambda e: None
    ignore_eos: bool = False                               # generate through eos (fixed-length benchmarks)
    ids: list[int] = field(default_factory=list)           # sampled tokens (an ending one included)
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: Optional[float] = None
    finish_reason: Optional[str] = None
    cancelled: bool = False

    def __post_init__(self):
        if not self.prompt:
            raise ValueError("a sequence needs at least one prompt token")
        self._stream: Optional[StopStream] = None
        self._generator: Optional[torch.Generator] = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _begin(self, tokenizer, device) -> None:
        self._stream = StopStream(self.stops.strings, tokenizer)
        if self.sampling.temperature > 0:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.sampling.seed)

    def _push(self, token: int, ends: set[int]) -> bool:
        """Take one sampled token; True when the sequence has ended."""
        self.ids.append(token)
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if token in ends:
            self._finish("stop")
            return True
        piece = self._stream.push_token(token)
        if self._stream.stopped:
            self._finish("stop", piece)
        elif len(self.ids) >= self.sampling.max_new_tokens:
            self._finish("length", piece)
        elif piece:
            self._emit(Event(piece))
        return self.done

    def _emit(self, event: Event) -> None:
        try:
            self.on_event(event)
        except Exception:  # a caller that went away must not stop the others' decoding
            log.debug("dropping an event of a finished request", exc_info=True)

    def _finish(self, reason: str, piece: str = "", error: Optional[str] = None) -> None:
        if self.done:
            return
        self.finish_reason = reason
        rest = self._stream.finish() if self._stream is not None and reason in ("stop", "length") else ""
        self._emit(Event(piece + rest, reason, error))

    @property
    def text(self) -> str:
        """The completion so far, cut before a stop string."""
        return self._stream.text if self._stream is not None else ""


class Scheduler:
    def __init__(self, model, tokenizer, *, max_batch: int = 16, max_queue: int = 64, max_len: int = 1024,
                 device=None, sinks: Optional[int] = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.max_len = max_batch, max_queue, max_len
        self.sinks = sinks  # caches keep the first `sinks` tokens past max_len (attention sinks); None: bounded
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None and tokenizer.pad_id >= 0 else 0
        eos = tokenizer.eos_id
        self.eos = {eos} if eos is not None and eos >= 0 else set()
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._cache = None
        self._last: Optional[torch.Tensor] = None   # (B,) each active row's newest token
        self._cv = threading.Condition()
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        # metrics
        self.generated_tokens = 0
        self.finished = 0
        self.peak_active = 0
        self._token_times: deque[tuple[float, int]] = deque()  # (time, tokens) per step, last 10 s
        self._ttft: deque[float] = deque(maxlen=1000)

    # ------------------------------------------------------------------ the caller's side

    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._loop, name="lmlab-scheduler", daemon=True)
        self._thread.start()
        return self

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence; QueueFull when max_queue sequences already wait."""
        with self._cv:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already")
            self._waiting.append(seq)
            self._cv.notify()

    def cancel(self, seq: Sequence) -> None:
        """Stop generating `seq` (its client left or timed out); its slot frees at the next step."""
        with self._cv:
            seq.cancelled = True
            self._cv.notify()

    def close(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def metrics(self) -> dict:
        now = time.monotonic()
        with self._cv:
            recent = [(t, n) for t, n in self._token_times if now - t <= 10.0]
            ttft = sorted(self._ttft)
            out = {"queue_depth": len(self._waiting), "active_sequences": len(self._active),
                   "generated_tokens": self.generated_tokens, "finished_sequences": self.finished,
                   "peak_active_sequences": self.peak_active}
        span = (now - recent[0][0]) if len(recent) > 1 else 0.0
        out["tokens_per_second"] = sum(n for _, n in recent[1:]) / span if span > 0 else 0.0
        out["ttft_seconds"] = {q: _quantile(ttft, q) for q in (0.5, 0.9, 0.99)} if ttft else {}
        out["ttft_count"] = len(ttft)
        return out

    # ------------------------------------------------------------------ the model's thread

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._waiting and not self._active:
                    self._cv.wait()
                if self._closed:
                    break
                room = self.max_batch - len(self._active)
                newcomers = []
                while self._waiting and len(newcomers) < room:
                    s = self._waiting.popleft()
                    if s.cancelled:
                        s._finish("cancelled")
                    else:
                        newcomers.append(s)
            try:
                with torch.inference_mode():
                    if newcomers:
                        self._admit(newcomers)
                    self._drop([s for s in self._active if not s.cancelled])
                    if self._active:
                        self._decode()
            except Exception as e:  # a bug or out of memory: fail these requests, keep serving
                log.exception("decoding failed")
                for s in self._active + newcomers:
                    s._finish("error", error=f"{type(e).__name__}: {e}")
                self._active, self._cache, self._last = [], None, None
        with self._cv:
            pending = list(self._waiting) + self._active
            self._waiting.clear()
        for s in pending:
            s._finish("error", error="the server is shutting down")

    def _admit(self, seqs: list[Sequence]) -> None:
        """Prefill the newcomers together, sample their first tokens, merge them into the batch."""
        for s in seqs:
            s._begin(self.tokenizer, self.device)
        lengths = [len(s.prompt) for s in seqs]
        longest = max(lengths)
        idx = torch.full((len(seqs), longest), self.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            idx[i, longest - len(s.prompt):] = torch.as_tensor(s.prompt, dtype=torch.long)
        pads = [longest - n for n in lengths]
        if self.sinks is None:
            cache = self.model.new_cache(len(seqs), self.max_len, device=self.device, left_pad=pads)
            chunk = longest
        else:  # a prompt longer than the cache is read in chunks that fit beside the sinks
            cache = self.model.new_cache(len(seqs), self.max_len, device=self.device, left_pad=pads, sinks=self.sinks)
            chunk = max(1, (self.max_len - self.sinks) // 2)
        idx = idx.to(self.device)
        for start in range(0, longest, chunk):
            logits, _ = self.model(idx[:, start:start + chunk], cache=cache, last_only=True)
        nxt = self._sample(logits[:, -1], seqs)
        keep = self._push(seqs, nxt)
        if not keep:
            return
        if len(keep) < len(seqs):
            cache.select(keep)
        kept = [seqs[i] for i in keep]
        nxt = nxt[keep]
        if self._cache is None:
            self._cache, self._active, self._last = cache, kept, nxt
        else:
            self._cache.merge(cache)
            self._active += kept
            self._last = torch.cat([self._last, nxt])
        self.peak_active = max(self.peak_active, len(self._active))

    def _decode(self) -> None:
        logits, _ = self.model(self._last[:, None], cache=self._cache)
        nxt = self._sample(logits[:, -1], self._active)
        keep = self._push(self._active, nxt)
        self._last = nxt
        self._drop([self._active[i] for i in keep])

    def _drop(self, keep: list[Sequence]) -> None:
        """Keep only the sequences `keep` (in batch order) in the batch and the cache."""
        if len(keep) == len(self._active):
            return
        for s in self._active:
            if s.cancelled and not s.done:
                s._finish("cancelled")
        if not keep:
            self._active, self._cache, self._last = [], None, None
            return
        rows = [i for i, s in enumerate(self._active) if s in keep]
        self._cache.select(rows)
        self._last = self._last[rows]
        self._active = [self._active[i] for i in rows]

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """One token per row, each with its own sequence's settings and generator."""
        out = logits.argmax(dim=-1)
        for i, s in enumerate(seqs):
            p = s.sampling
            if p.temperature > 0:
                out[i] = sample_next(logits[i:i + 1], p.temperature, p.top_k, p.top_p, s._generator)[0]
        return out

    def _push(self, seqs: list[Sequence], nxt: torch.Tensor) -> list[int]:
        """Hand each row its token; -> the rows still going."""
        toks = nxt.tolist()
        now = time.monotonic()
        keep = []
        for i, (s, t) in enumerate(zip(seqs, toks)):
            first = s.first_token_at is None
            if not s._push(t, set(s.stops.ids) if s.ignore_eos else self.eos | set(s.stops.ids)):
                keep.append(i)
            if first:
                self._ttft.append(s.first_token_at - s.submitted)
            if s.done:
                self.finished += 1
        with self._cv:
            self.generated_tokens += len(toks)
            self._token_times.append((now, len(toks)))
            while self._token_times and now - self._token_times[0][0] > 10.0:
                self._token_times.popleft()
        return keep


def _quantile(sorted_values: list[float], q: float) -> float:
    """The q-quantile of sorted values (nearest rank)."""
    i = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[i]
