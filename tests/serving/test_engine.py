"""The scheduler on its own (no HTTP): continuous batching joins and releases rows between steps, a row's
tokens equal its solo run whatever it is batched with, adapters are generated once and pinned while in
flight, and refused or cancelled requests touch nothing else."""
from __future__ import annotations

import threading
import time

import pytest
import torch

import hyperlora
from eval_helpers import hash_encoder, tiny_hypernet, tiny_llama, tiny_tokenizer
from hyperlora.serving.engine import Engine, QueueFullError, Request, SamplingParams
from hyperlora.serving.kv import BatchKV

POLICIES = [None] + [f"policy number {i}: answer politely about topic {i}" for i in range(7)]


@pytest.fixture(scope="module")
def parts():
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    hn = tiny_hypernet(model)
    return tok, model, hn


def make_engine(parts, **kw) -> Engine:
    tok, model, hn = parts
    rt = hyperlora.attach(model, hn, encoder=hash_encoder, max_adapters=kw.pop("max_adapters", 16), max_rank=8)
    return Engine(rt, pad_token_id=tok.pad_token_id, **kw)


class Client:
    """One request's events, collected."""

    def __init__(self, engine: Engine, tok, prompt: str, policy, n: int, **params):
        self.tokens: list[int] = []
        self.end = None
        self.done = threading.Event()
        self.first = threading.Event()
        self.req = Request(prompt=tok(prompt)["input_ids"], entry=policy, params=SamplingParams(max_tokens=n, **params),
                           emit=self.emit)

    def emit(self, kind, value):
        if kind == "token":
            self.tokens.append(value)
            self.first.set()
        else:
            self.end = (kind, value)
            self.done.set()


@pytest.fixture
def engine(parts):
    eng = make_engine(parts, max_batch=8, max_prefill_rows=3).start()
    yield eng
    eng.stop(10)
    eng.rt.detach()


def _prompts():
    return [f"record {i}: " + "hello world " * (1 + i % 3) for i in range(len(POLICIES))]


def test_concurrent_requests_equal_each_alone_token_for_token(engine, parts):
    tok = parts[0]
    lengths = [6 + 5 * (i % 4) for i in range(len(POLICIES))]
    alone = []
    for p, pol, n in zip(_prompts(), POLICIES, lengths):
        c = Client(engine, tok, p, pol, n)
        engine.submit(c.req)
        assert c.done.wait(30)
        alone.append(c.tokens)
    together = [Client(engine, tok, p, pol, n) for p, pol, n in zip(_prompts(), POLICIES, lengths)]
    for c in together:
        engine.submit(c.req)
    for c in together:
        assert c.done.wait(30) and c.end == ("done", "length")
    assert [c.tokens for c in together] == alone
    # the policies matter: served with no adapter, the same prompts give other tokens
    base = [Client(engine, tok, p, None, n) for p, n in zip(_prompts(), lengths)]
    for c in base:
        engine.submit(c.req)
    for c in base:
        assert c.done.wait(30)
    assert sum(b.tokens != a for b, a in zip(base[1:], alone[1:])) >= 5
    # 8 requests, at most 3 prefilled per step: the batch grew over several steps and ran mixed adapters
    m = engine.metrics
    assert m.prefill_rows.collect()[0].samples  # observed
    stats = engine.rt.stats()
    assert stats["generations"] == 7 and stats["pinned"] == 0 and stats["in_flight"] == 0


def _hist_max(hist) -> float:
    """The smallest bucket bound holding every observation."""
    samples = [s for s in hist.collect()[0].samples if s.name.endswith("_bucket")]
    total = max(s.value for s in samples)
    return min(float(s.labels["le"]) for s in samples if s.value == total)


def test_new_requests_join_the_running_batch_and_prefill_is_bounded(engine, parts):
    tok = parts[0]
    long = Client(engine, tok, "a long one", POLICIES[1], 200)
    engine.submit(long.req)
    assert long.first.wait(10)
    late = [Client(engine, tok, f"late {i}", POLICIES[2 + i % 3], 5) for i in range(5)]
    for c in late:
        engine.submit(c.req)
    for c in late:
        assert c.done.wait(30)
    assert not long.done.is_set() or len(long.tokens) == 200
    assert long.done.wait(30) and len(long.tokens) == 200
    assert _hist_max(engine.metrics.prefill_rows) <= 4  # bucket bound >= 3 rows (max_prefill_rows=3)
    assert _hist_max(engine.metrics.batch_rows) >= 4  # the late ones decoded beside the long one
    assert _hist_max(engine.metrics.step_adapters) >= 2


def test_one_adapter_per_policy_text_pinned_while_in_flight(engine, parts):
    tok = parts[0]
    text = "one shared policy for every request here"
    cs = [Client(engine, tok, f"prompt {i}", text, 40) for i in range(4)]
    for c in cs:
        engine.submit(c.req)
    assert cs[0].first.wait(10)
    key = engine.rt.pool.key_of(engine.rt.prepare([text])[0])
    assert engine.rt.pool.is_pinned(key)
    for c in cs:
        assert c.done.wait(30)
    assert engine.rt.stats()["generations"] == 1
    assert not engine.rt.pool.is_pinned(key)


def test_cancel_stops_a_generation_and_frees_its_row(engine, parts):
    tok = parts[0]
    c = Client(engine, tok, "cancel me", POLICIES[3], 450)
    other = Client(engine, tok, "keep me", POLICIES[4], 30)
    engine.submit(c.req)
    engine.submit(other.req)
    assert c.first.wait(10)
    engine.cancel(c.req)
    assert c.done.wait(10) and c.end == ("done", "cancelled") and len(c.tokens) < 450
    assert other.done.wait(30) and len(other.tokens) == 30
    alone = Client(engine, tok, "keep me", POLICIES[4], 30)
    engine.submit(alone.req)
    assert alone.done.wait(30) and alone.tokens == other.tokens
    t0 = time.time()
    while engine.load()["running"] and time.time() - t0 < 5:  # a row leaves right after its last event
        time.sleep(0.01)
    assert engine.load()["running"] == 0 and engine.rt.stats()["pinned"] == 0


def test_a_refused_policy_fails_alone(engine, parts):
    tok = parts[0]
    ok = Client(engine, tok, "fine", POLICIES[5], 20)
    bad = Client(engine, tok, "refused", "oneword", 20)
    engine.submit(ok.req)
    engine.submit(bad.req)
    assert bad.done.wait(10) and bad.end[0] == "error" and "single word" in str(bad.end[1])
    assert ok.done.wait(30) and len(ok.tokens) == 20
    assert engine.rt.stats()["pinned"] == 0


def test_sampled_rows_follow_their_seed_in_any_batch(engine, parts):
    tok = parts[0]
    kw = dict(temperature=0.9, top_p=0.9, seed=7)
    alone = Client(engine, tok, "sample me", POLICIES[6], 25, **kw)
    engine.submit(alone.req)
    assert alone.done.wait(30)
    cs = [Client(engine, tok, "sample me", POLICIES[6], 25, **kw)] + [
        Client(engine, tok, f"noise {i}", POLICIES[i], 25, temperature=1.0, seed=i) for i in range(4)]
    for c in cs:
        engine.submit(c.req)
    for c in cs:
        assert c.done.wait(30)
    assert cs[0].tokens == alone.tokens


def test_queue_bound_and_drain(parts):
    eng = make_engine(parts, max_batch=2, max_queue=2)  # not started: everything waits
    tok = parts[0]
    cs = [Client(eng, tok, f"p{i}", None, 3) for i in range(3)]
    eng.submit(cs[0].req)
    eng.submit(cs[1].req)
    with pytest.raises(QueueFullError):
        eng.submit(cs[2].req)
    eng.start()
    eng.drain()
    assert eng.join(30)
    assert all(c.done.is_set() and len(c.tokens) == 3 for c in cs[:2])
    eng.rt.detach()


def test_batch_kv_merge_then_select_restores_rows():
    from transformers.cache_utils import DynamicCache

    def kv(rows, T, seed):
        g = torch.Generator().manual_seed(seed)
        c = DynamicCache()
        c.update(torch.randn(rows, 2, T, 4, generator=g), torch.randn(rows, 2, T, 4, generator=g), 0)
        mask = torch.ones(rows, T, dtype=torch.long)
        return BatchKV(c, mask, torch.full((rows, 1), T - 1))

    a, b = kv(2, 5, 0), kv(3, 2, 1)
    ka, kb = a.cache.layers[0].keys.clone(), b.cache.layers[0].keys.clone()
    m = BatchKV.merge(a, b)
    assert m.rows == 5 and m.length == 5 and m.mask[2:, :3].sum() == 0
    only_b = m.select([2, 3, 4])
    assert only_b.length == 2 and torch.equal(only_b.cache.layers[0].keys, kb)
    m2 = BatchKV.merge(kv(2, 5, 0), kv(3, 2, 1)).select([0, 1])
    assert torch.equal(m2.cache.layers[0].keys, ka) and m2.length == 5


def test_max_adapters_per_step_serves_one_policy_at_a_time(parts):
    """max_adapters_per_step=1 (serve --max-adapters-per-step 1, the load benchmark's single-adapter baseline):
    no decode step holds two adapters, rows without a policy still join, the head of the queue waits FIFO for
    the other adapter's rows to leave, and every reply equals the unlimited engine's."""
    tok = parts[0]
    order = [POLICIES[1], POLICIES[1], None, POLICIES[2], POLICIES[1], POLICIES[2]]
    prompts = [f"row {i}: " + "hello " * (1 + i % 2) for i in range(len(order))]
    replies = {}
    for limit in (None, 1):
        eng = make_engine(parts, max_batch=8, max_prefill_rows=8, max_adapters_per_step=limit)  # all queued first
        cs = [Client(eng, tok, p, pol, 12) for p, pol in zip(prompts, order)]
        for c in cs:
            eng.submit(c.req)
        eng.start()
        for c in cs:
            assert c.done.wait(30) and c.end == ("done", "length")
        eng.stop(10)
        eng.rt.detach()
        replies[limit] = [c.tokens for c in cs]
        if limit is None:
            assert _hist_max(eng.metrics.step_adapters) >= 2  # unlimited: the policies shared steps
            assert eng.steps == 11  # one prefill token, then 11 decode steps for all six rows
        else:
            assert _hist_max(eng.metrics.step_adapters) <= 1
            assert _hist_max(eng.metrics.batch_rows) >= 3  # P1, P1 and the base row decoded together
            # FIFO, no reordering: {P1, P1, base}, then P2, then the later P1 (queued behind P2), then P2
            assert eng.steps == 4 * 11
    assert replies[1] == replies[None]
    with pytest.raises(ValueError, match="max_adapters_per_step"):
        make_engine(parts, max_adapters_per_step=0)
