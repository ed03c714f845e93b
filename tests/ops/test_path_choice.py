"""dispatch: the materialized-vs-latent cost model's decisions at the extremes, monotonicity, calibration."""
from __future__ import annotations

import importlib
import dataclasses
import logging

import pytest
import torch

from hyperlora.ops import path_choice as dispatch
from hyperlora.ops.path_choice import DEFAULT_PROFILES, choose_path, estimate

GPUS = [DEFAULT_PROFILES["h100"], DEFAULT_PROFILES["h200"]]
ALL = GPUS + [DEFAULT_PROFILES["cpu"], DEFAULT_PROFILES["cuda"]]


@pytest.mark.parametrize("profile", ALL, ids=lambda p: p.name)
@pytest.mark.parametrize("hidden", [576, 1024, 4096])
def test_one_policy_prefill_is_materialized(profile, hidden):
    c = choose_path(2048, 1, hidden, hidden, 8, 33, torch.bfloat16, profile=profile)
    assert c.path == "materialized"
    assert c.materialized.seconds < c.latent.seconds and c.ratio >= 1


@pytest.mark.parametrize("profile", GPUS, ids=lambda p: p.name)
def test_256_policies_decode_at_4096_is_latent(profile):
    c = choose_path(256, 256, 4096, 4096, 8, 33, torch.bfloat16, profile=profile)
    assert c.path == "latent"
    # the reason: the adapters' bytes dwarf the head's
    assert c.materialized.bytes > 3 * c.latent.bytes
    assert c.latent.flops > c.materialized.flops


def test_latent_bytes_do_not_grow_with_policies():
    prof = DEFAULT_PROFILES["h100"]
    m1, l1 = estimate(1024, 1, 4096, 4096, 8, 33, 2, prof)
    m2, l2 = estimate(1024, 1024, 4096, 4096, 8, 33, 2, prof)
    assert l2.bytes - l1.bytes <= 4 * 33 * 1024          # only the latents themselves (K floats each)
    assert m2.bytes - m1.bytes == 2 * 1023 * 8 * (4096 + 4096)
    assert l1.flops == l2.flops and m1.flops == m2.flops


@pytest.mark.parametrize("profile", ALL, ids=lambda p: p.name)
@pytest.mark.parametrize("hidden", [576, 4096])
def test_monotone_in_policies_and_tokens(profile, hidden):
    """At fixed tokens, more distinct policies never favour materialized; at fixed policies, adding tokens
    can switch latent -> materialized but never back; along each axis the decision flips at most once."""
    def adv(t, p):
        c = choose_path(t, p, hidden, hidden, 8, 33, 2, profile=profile)
        return c.materialized.seconds / c.latent.seconds, c.path

    policies = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    for tokens in (1, 64, 1024, 8192):
        row = [adv(tokens, p) for p in policies if p <= tokens]
        assert all(b[0] >= a[0] * (1 - 1e-9) for a, b in zip(row, row[1:])), (tokens, row)
        paths = [r[1] for r in row]
        assert paths == sorted(paths, key=lambda s: s == "latent"), paths
    for p in (1, 16, 256):
        # (the ratio itself need not be monotone in tokens: the head's bytes amortize over more tokens
        # until the latent GEMMs turn compute-bound; only the decision must flip at most once)
        col = [adv(p * tpp, p) for tpp in (1, 2, 8, 32, 256, 4096)]
        paths = [r[1] for r in col]
        assert paths == sorted(paths, key=lambda s: s == "materialized"), paths


def test_bigger_latent_dim_favours_materialized():
    prof = DEFAULT_PROFILES["h100"]
    adv = [(lambda c: c.materialized.seconds / c.latent.seconds)(choose_path(256, 256, 4096, 4096, 8, k, 2, profile=prof))
           for k in (9, 17, 33, 65, 129, 257)]
    assert all(b <= a for a, b in zip(adv, adv[1:])), adv
    assert choose_path(256, 256, 4096, 4096, 8, 1025, 2, profile=prof).path == "materialized"


def test_choice_is_logged_at_debug(caplog):
    prof = dataclasses.replace(DEFAULT_PROFILES["h100"], name="log-test-profile")
    with caplog.at_level(logging.DEBUG, logger="hyperlora.ops.path_choice"):
        choose_path(300, 77, 4096, 1024, 8, 33, torch.float16, profile=prof)
    assert any("latent" in r.getMessage() and "log-test-profile" in r.getMessage() and r.levelno == logging.DEBUG
               for r in caplog.records)


@pytest.mark.parametrize("kw,exc,needle", [
    (dict(tokens=-1), ValueError, "tokens"),
    (dict(rank=0), ValueError, "rank"),
    (dict(latent_k=0), ValueError, "latent_k"),
    (dict(d_in=2.5), TypeError, "d_in"),
    (dict(dtype=torch.int32), TypeError, "dtype"),
    (dict(dtype=3), ValueError, "dtype"),
])
def test_bad_arguments(kw, exc, needle):
    args = dict(tokens=4, policies=2, d_in=64, d_out=64, rank=4, latent_k=9, dtype=torch.float32,
                profile=DEFAULT_PROFILES["cpu"])
    args.update(kw)
    with pytest.raises(exc, match=needle):
        choose_path(**args)


@pytest.fixture
def one_thread():
    """On a 2-core machine shared with other jobs, 2-thread OpenMP regions can stall ~50 ms each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_calibration_measures_and_caches(monkeypatch, one_thread):
    monkeypatch.setenv("HYPERLORA_CALIBRATE", "1")
    dispatch._profile_for.cache_clear()
    p = dispatch.device_profile("cpu")
    assert p.source == "calibrated" and p.bandwidth > 1e8 and p.flops32 > 1e8 and p.flops >= p.flops32 * 0.5
    assert dispatch.device_profile("cpu") is p
    monkeypatch.setenv("HYPERLORA_CALIBRATE", "0")
    dispatch._profile_for.cache_clear()
    assert dispatch.device_profile("cpu") == DEFAULT_PROFILES["cpu"]
    dispatch._profile_for.cache_clear()
    # the device argument reaches the decision
    c = choose_path(1, 1, 64, 64, 4, 9, torch.float32, device="cpu")
    assert c.profile == "cpu" and c.path in dispatch.PATHS
    dispatch._profile_for.cache_clear()


def test_op_calibration_finds_per_adapter_cost(monkeypatch, one_thread):
    """A stand-in materialized op that sleeps 0.5 ms per distinct adapter: calibration must see ~0.5 ms each."""
    import time as _time

    from hyperlora.ops.metadata import build_meta

    def add_lora(y, x, a, b, slots, scales=None, ranks=None, *, backend=None, meta=None):
        m = meta if meta is not None else build_meta(slots, a.shape[0])
        for _ in range(m.num_segments):
            _time.sleep(5e-4)
        return y

    monkeypatch.setattr(dispatch._add_lora_mod, "add_lora", add_lora)
    prof = dispatch._calibrate_ops(torch.device("cpu"), DEFAULT_PROFILES["cpu"])
    assert 3e-4 < prof.segment_s < 2e-3, prof
    assert prof.materialized_fixed_s < 5e-3 and 0 < prof.latent_fixed_s < 1e-2 and 0.05 <= prof.latent_efficiency <= 1
    # and the decision moves with it: with costly segments, many policies go latent sooner
    slow = choose_path(64, 64, 576, 576, 8, 33, torch.float32, profile=prof)
    assert slow.path == "latent" and slow.materialized.seconds > 64 * 3e-4


def _fake_ops(monkeypatch, mat_s: float, lat_s: float) -> dict:
    """Stand-in add_lora / latent_lora that take known times on a fake clock (sleeps are far too coarse on
    a loaded CI machine); returns their call counters."""
    import types

    lat_mod = importlib.import_module("hyperlora.ops.latent_lora")  # the module: hyperlora.ops.latent_lora names the function

    calls = {"mat": 0, "lat": 0}
    clock = [0.0]

    def add_lora(*a, **k):
        calls["mat"] += 1
        clock[0] += mat_s

    def latent_lora(*a, **k):
        calls["lat"] += 1
        clock[0] += lat_s

    monkeypatch.setattr(dispatch._add_lora_mod, "add_lora", add_lora)
    monkeypatch.setattr(lat_mod, "latent_lora", latent_lora)
    monkeypatch.setattr(dispatch, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(dispatch, "_MEASURED", {})
    monkeypatch.setenv("HYPERLORA_DISPATCH_MEASURE", "1")
    return calls


def _close_call_profile(monkeypatch):
    """Make the device profile one under which (T=64, P=64, 576, R 8, K 33, fp32) is a close call."""
    prof = DEFAULT_PROFILES["cpu"]
    c = choose_path(64, 64, 576, 576, 8, 33, torch.float32, profile=prof)
    m, l = c.materialized.seconds, c.latent.seconds
    assert max(m, l) / min(m, l) < dispatch._MEASURE_RATIO and max(m, l) < dispatch._MEASURE_MAX_S
    monkeypatch.setattr(dispatch, "device_profile", lambda device=None: prof)
    return c


def test_close_call_follows_the_timing_not_the_model(monkeypatch):
    model = _close_call_profile(monkeypatch)
    # the ops say the opposite of the model, by a wide margin: the timing must win
    slow, fast = 0.004, 0.0005
    calls = _fake_ops(monkeypatch, mat_s=fast if model.path == "latent" else slow,
                      lat_s=slow if model.path == "latent" else fast)
    c = choose_path(64, 64, 576, 576, 8, 33, torch.float32, device="cpu")
    assert c.measured is not None and c.path != model.path
    assert calls["mat"] == calls["lat"] == 4  # one warm-up + three timed rounds each
    # cached per bucket: 50 tokens / 40 adapters fall in the same (64, 64) bucket, nothing is timed again
    c2 = choose_path(50, 40, 576, 576, 8, 33, torch.float32, device="cpu")
    assert calls["mat"] == 4 and c2.path == c.path and c2.measured == c.measured


def test_no_timing_when_off_for_what_ifs_or_far_apart(monkeypatch):
    _close_call_profile(monkeypatch)
    calls = _fake_ops(monkeypatch, mat_s=0.0, lat_s=0.0)
    monkeypatch.setenv("HYPERLORA_DISPATCH_MEASURE", "0")
    assert choose_path(64, 64, 576, 576, 8, 33, torch.float32, device="cpu").measured is None
    monkeypatch.setenv("HYPERLORA_DISPATCH_MEASURE", "1")
    # an explicit profile is a what-if: never timed
    assert choose_path(64, 64, 576, 576, 8, 33, torch.float32, profile=DEFAULT_PROFILES["cpu"]).measured is None
    # too costly to check (1 policy, 16384 tokens at 4096: the latent estimate is over a second)
    assert choose_path(16384, 1, 4096, 4096, 8, 33, torch.float32, device="cpu").measured is None
    assert calls == {"mat": 0, "lat": 0}


def test_close_call_with_the_real_ops(monkeypatch, one_thread):
    """The real add_lora and latent_lora time without error at a small close-call shape."""
    _close_call_profile(monkeypatch)
    monkeypatch.setattr(dispatch, "_MEASURED", {})
    monkeypatch.setenv("HYPERLORA_DISPATCH_MEASURE", "1")
    c = choose_path(64, 64, 576, 576, 8, 33, torch.float32, device="cpu")
    assert c.measured is not None and all(t > 0 for t in c.measured)
    assert c.path == ("latent" if c.measured[1] < c.measured[0] else "materialized")


@pytest.mark.gpu
def test_gpu_profile_is_calibrated():
    dispatch._profile_for.cache_clear()
    p = dispatch.device_profile("cuda")
    assert p.bandwidth > 1e11 and p.flops > 1e13
