"""build_meta / LoraBatchMeta against a plain-Python segmentation of the slots."""
from __future__ import annotations

import pytest
import torch

from hyperlora.ops.metadata import LoraBatchMeta, build_meta


def python_segments(slots: list[int], num_slots: int):
    """Oracle: (token order, [(slot, start, count)]) by a stable sort in pure Python."""
    order = sorted(range(len(slots)), key=lambda t: (slots[t] < 0, slots[t]))
    segs, start = [], 0
    for s in range(num_slots):
        n = sum(1 for v in slots if v == s)
        if n:
            segs.append((s, start, n))
            start += n
    return order, segs


def check_meta(meta: LoraBatchMeta, slots: list[int], num_slots: int, host: bool = True) -> None:
    order, segs = python_segments(slots, num_slots)
    n_act = sum(1 for v in slots if v >= 0)
    assert meta.token_ids.tolist() == order
    assert meta.num_active.tolist() == [len(segs), n_act]
    m = len(segs)
    assert list(zip(meta.seg_slots[:m].tolist(), meta.seg_starts[:m].tolist(), meta.seg_counts[:m].tolist())) == segs
    assert meta.seg_counts[m:].tolist() == [0] * (num_slots - m)
    # unused segment slots are the absent slots, so seg_slots is a permutation of 0..S-1
    assert sorted(meta.seg_slots.tolist()) == list(range(num_slots))
    if host:
        assert meta.host_segments == segs
        assert meta.num_segments == m and meta.num_active_tokens == n_act
        assert meta.max_segment_len == max((c for _, _, c in segs), default=0)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("case", ["random", "all_minus_one", "one_token", "one_slot", "missing_slots", "sorted"])
def test_build_meta_matches_python(dtype, case):
    torch.manual_seed(hash(case) % 1000)
    S = 7
    slots = {
        "random": torch.randint(-1, S, (53,)),
        "all_minus_one": torch.full((11,), -1),
        "one_token": torch.tensor([4]),
        "one_slot": torch.full((9,), 2),
        "missing_slots": torch.tensor([6, 0, 6, -1, 0, 3, 6, -1]),
        "sorted": torch.tensor([0, 0, 1, 1, 1, 5]),
    }[case].to(dtype)
    meta = build_meta(slots, S)
    check_meta(meta, slots.tolist(), S)
    assert all(t.dtype == torch.int32 for t in meta.tensors())


def test_stable_order_within_a_slot():
    slots = torch.tensor([1, 0, 1, 1, 0, -1, 1])
    meta = build_meta(slots, 2)
    assert meta.token_ids.tolist() == [1, 4, 0, 2, 3, 6, 5]


def test_fixed_size_buffers_refill_without_host_summary():
    torch.manual_seed(0)
    S, T = 5, 17
    buf = LoraBatchMeta.empty(T, S)
    ptrs = [t.data_ptr() for t in buf.tensors()]
    for _ in range(3):
        slots = torch.randint(-1, S, (T,))
        out = build_meta(slots, S, out=buf)
        assert out is buf and [t.data_ptr() for t in buf.tensors()] == ptrs
        assert not buf.has_host_summary and buf.max_segment_len is None
        check_meta(buf, slots.tolist(), S, host=False)
        check_meta(buf.with_host_summary(), slots.tolist(), S, host=True)
        buf.host_segments = None


def test_empty_batch():
    meta = build_meta(torch.zeros(0, dtype=torch.int64), 3)
    assert meta.num_segments == 0 and meta.num_active_tokens == 0 and meta.token_ids.numel() == 0


@pytest.mark.parametrize("slots,num_slots,match", [
    (torch.tensor([0, 3]), 3, r"slots values must be in \[-1, 2\]"),
    (torch.tensor([0, -2]), 3, r"got min -2"),
    (torch.tensor([[0, 1]]), 3, r"slots must be 1-D"),
    (torch.tensor([0.0, 1.0]), 3, r"slots must be int32 or int64"),
    (torch.tensor([0, 1]), 0, r"num_slots must be a positive int"),
])
def test_build_meta_rejects_bad_input(slots, num_slots, match):
    with pytest.raises(ValueError, match=match):
        build_meta(slots, num_slots)


def test_out_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match=r"out was allocated for \(T=4, S=3\)"):
        build_meta(torch.tensor([0, 1, 2]), 3, out=LoraBatchMeta.empty(4, 3))


def test_slots_not_a_tensor():
    with pytest.raises(TypeError, match="slots must be a torch.Tensor"):
        build_meta([0, 1], 2)  # type: ignore[arg-type]
