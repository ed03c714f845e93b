"""Continuous mixed-policy batching: one scheduler thread owns the `Runtime` and runs the model step by step.

Each loop of the thread:

1. drops cancelled requests (a client that went away) from the queue and the running batch;
2. admits waiting requests, FIFO, up to ``max_batch`` running rows and at most ``max_prefill_rows`` requests /
   ``max_prefill_tokens`` prompt tokens per step (so a burst of new prompts never starves the decodes): each
   one's adapter is resolved (``Runtime.prepare``: a pool hit, or generated once per policy text) and pinned
   in the pool until the request leaves; the admitted prompts are prefilled together, left padded, in one
   forward under their own adapters, and their rows join the running batch's KV cache (`BatchKV.merge`);
3. runs one decode step over every running row, each row with its own adapter (or none), all in one forward
   (``Runtime.policies``: the pool slots are held in flight for the step);
4. releases finished rows (`BatchKV.select`) and unpins adapters no running row uses any more.

A row's tokens never depend on its batch-mates: positions come from its own attention mask, padding gets zero
attention weight, sampling draws from a generator per request. Requests with a ``job`` (``decide()`` for a request
with ``options``) run it on the scheduler thread, between steps, and never join the batch.

Only `submit`, `cancel`, `drain` and `stop` may be called from other threads; everything that touches the
model or the pool runs on the scheduler thread.
"""
from __future__ import annotations

import collections
import inspect
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from hyperlora.adapters.pool import PoolFullError
from hyperlora.modeling.decoding import cache_kwarg, cache_of, filter_logits  # the decode loop's helpers
from hyperlora.modeling.padding import left_pad
from hyperlora.runtime.runtime import Runtime
from hyperlora.serving.kv import BatchKV, check_cache
from hyperlora.serving.metrics import Metrics

log = logging.getLogger(__name__)

__all__ = ["SamplingParams", "Request", "Engine", "QueueFullError", "DrainingError", "RequestError"]


class QueueFullError(RuntimeError):
    """The waiting queue holds ``max_queue`` requests (HTTP 429)."""


class DrainingError(RuntimeError):
    """The engine is draining or stopped and admits nothing new (HTTP 503)."""


class RequestError(ValueError):
    """A request that cannot be served as given (its policy was refused, ...): HTTP 400, nothing else touched."""


@dataclass(frozen=True)
class SamplingParams:
    """max_tokens >= 1; temperature 0 = greedy (then top_p / top_k / seed are unused); stop_token_ids end the
    reply (not emitted)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation request (or one job: a `decide` call run on the scheduler thread).

    prompt: token ids; entry: what the runtime serves this row with (a policy text, a loaded adapter name, or
    None for the base model); job: a callable run on the scheduler thread once the entry's adapter is in the
    pool (its return value is emitted as ("result", value)); prepare_only: only resolve the adapter (errors as
    for a generation), then finish;
    emit(kind, value) is called on the scheduler thread with ("token", id), ("result", value),
    ("done", finish_reason: "stop" | "length" | "cancelled") or ("error", exception): exactly one of the last
    two ends the request."""

    prompt: list[int]
    entry: str | None
    params: SamplingParams
    emit: Callable[[str, Any], None]
    job: Callable[[], Any] | None = None  # run on the scheduler thread instead of generating (decide())
    prepare_only: bool = False  # resolve (generate) the adapter and finish: POST /v1/policies warms the pool
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    generated: list[int] = field(default_factory=list)
    t_submit: float = 0.0
    t_last: float = 0.0
    _key: str | None = None
    _gen: torch.Generator | None = None
    _done: bool = False


class Engine:
    """The scheduler thread and its queue. rt: an attached Runtime (the engine becomes its only user).

    max_batch: running rows; max_queue: waiting requests before `submit` raises QueueFullError;
    max_prefill_rows / max_prefill_tokens: admitted per step; max_len: prompt + reply positions (default the
    model's max_position_embeddings); pad_token_id: the id padding columns hold (never attended);
    max_adapters_per_step: at most this many distinct adapters (policies or PEFT adapters; rows without one not
    counted) among the running rows, default None (no limit). 1 makes a one-policy-at-a-time server (a
    single-adapter stack, the load benchmark's baseline): the head of the queue waits, FIFO, until the rows of
    the other adapter have left."""

    def __init__(self, rt: Runtime, *, max_batch: int = 32, max_queue: int = 256, max_prefill_rows: int = 8,
                 max_prefill_tokens: int = 2048, max_len: int | None = None, pad_token_id: int = 0,
                 metrics: Metrics | None = None, max_adapters_per_step: int | None = None):
        if max_batch < 1 or max_queue < 0 or max_prefill_rows < 1 or max_prefill_tokens < 1:
            raise ValueError("max_batch, max_prefill_rows and max_prefill_tokens must be >= 1, max_queue >= 0")
        if max_adapters_per_step is not None and max_adapters_per_step < 1:
            raise ValueError(f"max_adapters_per_step must be >= 1 (or None: no limit), got {max_adapters_per_step}")
        self.max_adapters_per_step = max_adapters_per_step
        self.rt, self.model = rt, rt.model
        self.max_batch, self.max_queue = int(max_batch), int(max_queue)
        self.max_prefill_rows, self.max_prefill_tokens = int(max_prefill_rows), int(max_prefill_tokens)
        cfg = getattr(self.model, "config", None)
        self.max_len = int(max_len or getattr(cfg, "max_position_embeddings", None) or 2048)
        self.pad = int(pad_token_id)
        self.metrics = metrics or Metrics(rt.stats)
        self.device = next(self.model.parameters()).device
        self._cache_kw = cache_kwarg(self.model)
        try:
            self._keep_kw = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):
            self._keep_kw = False
        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []
        self._kv: BatchKV | None = None
        self._pins: dict[str, int] = {}
        self._draining = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._cache_checked = False
        self.steps = 0  # decode steps run (tests and /health read it)

    # ---- other threads ----------------------------------------------------------------------

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="hyperlora-engine", daemon=True)
            self._thread.start()
        return self

    def submit(self, req: Request) -> None:
        """Queue `req` (admitted at the next step). QueueFullError when the queue is full, DrainingError after
        `drain` / `stop`, RequestError for a prompt the model cannot hold."""
        generates = req.job is None and not req.prepare_only
        if not req.prompt and generates:
            raise RequestError("the prompt is empty")
        if len(req.prompt) + (req.params.max_tokens if generates else 0) > self.max_len:
            raise RequestError(f"the prompt ({len(req.prompt)} tokens) plus max_tokens ({req.params.max_tokens}) "
                               f"exceeds the model's {self.max_len} positions")
        with self._cv:
            if self._draining or self._stopping:
                raise DrainingError("the server is shutting down and admits no new requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting)")
            req.t_submit = time.perf_counter()
            self._waiting.append(req)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cv.notify()

    def cancel(self, req: Request) -> None:
        """Stop generating for `req` (its client went away); it leaves the batch at the next step."""
        with self._cv:
            req.cancelled = True
            self._cv.notify()

    def drain(self) -> None:
        """Admit nothing new; the thread exits once the queue and the running batch are empty."""
        with self._cv:
            self._draining = True
            self._cv.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Cancel everything and end the thread (waits up to `timeout` seconds)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end (after `drain` or `stop`); True if it has."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    @property
    def draining(self) -> bool:
        return self._draining or self._stopping

    def load(self) -> dict[str, int]:
        with self._cv:
            return {"waiting": len(self._waiting), "running": len(self._running), "steps": self.steps}

    # ---- the scheduler thread ---------------------------------------------------------------

    def _loop(self) -> None:
        with torch.no_grad():
            while True:
                with self._cv:
                    while not (self._waiting or self._running or self._stopping or self._draining):
                        self._cv.wait()
                    if self._stopping or (self._draining and not self._waiting and not self._running):
                        break
                try:
                    self._step()
                except Exception as exc:  # a bug or an unexpected model error: fail what is in flight, keep serving
                    log.exception("hyperlora serve: a step failed; failing its %d running requests", len(self._running))
                    for r in list(self._running):
                        self._finish(r, error=exc)
                    self._running, self._kv = [], None
            for r in list(self._running) + list(self._waiting):
                self._finish(r, reason="cancelled")
            self._running, self._kv = [], None
            self._waiting.clear()

    def _step(self) -> None:
        self._drop_cancelled()
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
            self._release_finished()
        if self._running:
            self._decode()
            self._release_finished()
        self.metrics.running.set(len(self._running))

    def _drop_cancelled(self) -> None:
        with self._cv:
            gone = [r for r in self._waiting if r.cancelled]
            for r in gone:
                self._waiting.remove(r)
            self.metrics.queue_depth.set(len(self._waiting))
        for r in gone:
            self._finish(r, reason="cancelled")
        for r in self._running:
            if r.cancelled:
                self._finish(r, reason="cancelled")
        self._release_finished()

    def _admit(self) -> list[Request]:
        batch: list[Request] = []
        tokens = 0
        while len(batch) < self.max_prefill_rows and len(self._running) + len(batch) < self.max_batch:
            with self._cv:
                if not self._waiting:
                    break
                req = self._waiting[0]
                if batch and tokens + len(req.prompt) > self.max_prefill_tokens:
                    break
                if self._over_adapter_limit(req, batch):  # FIFO: the head waits for the other adapter's rows
                    break
                self._waiting.popleft()
                self.metrics.queue_depth.set(len(self._waiting))
            if req.cancelled:
                self._finish(req, reason="cancelled")
                continue
            try:
                self._acquire(req)
            except PoolFullError as exc:  # every slot pinned by running rows: wait for some to finish
                if not self._running and not batch:  # nothing will free a slot: the pool is too small
                    self._finish(req, error=exc)
                    continue
                with self._cv:
                    self._waiting.appendleft(req)
                break
            except (KeyError, ValueError, TypeError) as exc:  # the runtime refused the entry: nothing was touched
                msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
                self._finish(req, error=RequestError(str(msg)))
                continue
            if req.prepare_only:
                self._finish(req, reason="stop")
                continue
            if req.job is not None:
                try:
                    req.emit("result", req.job())
                    self._finish(req, reason="stop")
                except (KeyError, ValueError, TypeError) as exc:  # refused input (decide validates its own)
                    self._finish(req, error=RequestError(str(exc.args[0] if exc.args else exc)))
                except Exception as exc:  # fails this request only
                    log.exception("hyperlora serve: a job failed")
                    self._finish(req, error=exc)
                continue
            tokens += len(req.prompt)
            batch.append(req)
        return batch

    def _over_adapter_limit(self, req: Request, batch: list[Request]) -> bool:
        """Would admitting `req` put more than max_adapters_per_step distinct adapters among the running rows?
        Jobs and registrations never join the batch and are not held back."""
        if self.max_adapters_per_step is None or req.entry is None or req.job is not None or req.prepare_only:
            return False
        entries = {r.entry for r in itertools.chain(self._running, batch) if r.entry is not None}
        return req.entry not in entries and len(entries) >= self.max_adapters_per_step

    def _acquire(self, req: Request) -> None:
        """Resolve the request's adapter into the pool (generating a policy's adapter once) and pin it."""
        if req.entry is None:
            return
        t0 = time.perf_counter()
        slot = self.rt.prepare([req.entry])[0]
        key = self.rt.pool.key_of(slot)
        if self._pins.get(key, 0) == 0:
            self.rt.pool.pin(key)
        self._pins[key] = self._pins.get(key, 0) + 1
        req._key = key
        self.metrics.adapter_prepare.observe(time.perf_counter() - t0)

    def _release(self, req: Request) -> None:
        key, req._key = req._key, None
        if key is None:
            return
        n = self._pins.get(key, 0) - 1
        if n <= 0:
            self._pins.pop(key, None)
            if key in self.rt.pool:
                self.rt.pool.unpin(key)
        else:
            self._pins[key] = n

    def _forward(self, entries: Sequence[str | None], keep: int | None = None, **kw) -> Any:
        if keep is not None and self._keep_kw:
            kw["logits_to_keep"] = keep
        with self.rt.policies(list(entries)):
            return self.model(use_cache=True, **kw)

    def _prefill(self, batch: list[Request]) -> None:
        ids, mask = left_pad([r.prompt for r in batch], self.pad, self.device)
        mask = mask.to(torch.long)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self._forward([r.entry for r in batch], keep=1, input_ids=ids, attention_mask=mask, position_ids=pos)
        cache = cache_of(out)
        if not self._cache_checked:
            check_cache(cache)
            self._cache_checked = True
        self.metrics.prefill_rows.observe(len(batch))
        self.metrics.prompt_tokens.inc(sum(len(r.prompt) for r in batch))
        toks = self._sample(out.logits[:, -1, :], batch)
        self._kv = BatchKV.merge(self._kv, BatchKV(cache, mask, pos[:, -1:]))
        self._running.extend(batch)
        for r, t in zip(batch, toks):
            self._accept(r, t)

    def _decode(self) -> None:
        rows = self._running
        kv = self._kv
        assert kv is not None and kv.rows == len(rows)
        t0 = time.perf_counter()
        inp = torch.tensor([[r.generated[-1]] for r in rows], dtype=torch.long, device=self.device)
        kv.append_column()
        out = self._forward([r.entry for r in rows], input_ids=inp, attention_mask=kv.mask, position_ids=kv.last_pos,
                            **{self._cache_kw: kv.cache})
        kv.cache = cache_of(out)
        toks = self._sample(out.logits[:, -1, :], rows)
        self.steps += 1
        self.metrics.batch_rows.observe(len(rows))
        self.metrics.step_adapters.observe(len({r._key for r in rows if r._key is not None}))
        for r, t in zip(rows, toks):
            self._accept(r, t)
        self.metrics.step_seconds.observe(time.perf_counter() - t0)

    def _sample(self, logits: torch.Tensor, rows: Sequence[Request]) -> list[int]:
        logits = logits.float()
        out = logits.argmax(dim=-1).tolist()
        for i, r in enumerate(rows):
            p = r.params
            if p.greedy:
                continue
            if r._gen is None:
                r._gen = torch.Generator(device=self.device)
                r._gen.manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**62, ()).item()))
            probs = torch.softmax(filter_logits(logits[i:i + 1], p.temperature, p.top_k, p.top_p), dim=-1)
            out[i] = int(torch.multinomial(probs[0], 1, generator=r._gen).item())
        return out

    def _accept(self, r: Request, tok: int) -> None:
        now = time.perf_counter()
        if r.cancelled:
            self._finish(r, reason="cancelled")
            return
        r.generated.append(tok)
        if len(r.generated) == 1:
            self.metrics.ttft.observe(now - r.t_submit)
        else:
            self.metrics.tpot.observe(now - r.t_last)
        r.t_last = now
        if tok in r.params.stop_token_ids:
            self._finish(r, reason="stop")
            return
        self.metrics.generation_tokens.inc()
        r.emit("token", tok)
        if len(r.generated) >= r.params.max_tokens or len(r.prompt) + len(r.generated) >= self.max_len:
            self._finish(r, reason="length")

    def _finish(self, r: Request, *, reason: str | None = None, error: BaseException | None = None) -> None:
        if r._done:
            return
        r._done = True
        self._release(r)
        self.metrics.finished.labels(reason=reason or "error").inc()
        try:
            r.emit("error", error) if error is not None else r.emit("done", reason)
        except Exception:  # the client's side is gone; nothing to tell
            log.debug("hyperlora serve: emit failed for request %d", r.id, exc_info=True)

    def _release_finished(self) -> None:
        keep = [i for i, r in enumerate(self._running) if not r._done]
        if len(keep) == len(self._running):
            return
        self._running = [self._running[i] for i in keep]
        self._kv = self._kv.select(keep) if self._kv is not None else None
