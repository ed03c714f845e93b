"""Tests for hyperlora.modeling.padding: the one copy of left/right padding of token-id lists, checked against
the inline copies it replaced (same values, dtype and layout)."""
from __future__ import annotations

import random

import pytest
import torch

from hyperlora.modeling.padding import left_pad, pad_ids, pad_right


def _old_right(seqs, pad):  # the inline copy of reader.py / reply_format.py / rule_train.py
    ids = torch.full((len(seqs), max(map(len, seqs))), pad)
    for j, q in enumerate(seqs):
        ids[j, : len(q)] = torch.tensor(q)
    return ids


def _old_left(seqs, pad):  # the copy of decoding.left_pad / evaluation.sources
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, T - len(s):] = 1
    return ids, mask


def _random_batches(n=30, seed=0):
    rng = random.Random(seed)
    for _ in range(n):
        yield [[rng.randrange(50000) for _ in range(rng.randrange(1, 12))] for _ in range(rng.randrange(1, 6))]


@pytest.mark.parametrize("pad", [0, 2, 49152])
def test_right_padding_matches_the_inline_copies(pad):
    for seqs in _random_batches():
        ids, mask = pad_ids(seqs, pad)
        old = _old_right(seqs, pad)
        assert ids.dtype == old.dtype == torch.long and torch.equal(ids, old)
        assert mask.tolist() == [[1] * len(s) + [0] * (ids.shape[1] - len(s)) for s in seqs]
        ids2, last = pad_right(seqs, pad)
        assert torch.equal(ids2, old) and last.tolist() == [len(s) - 1 for s in seqs]


@pytest.mark.parametrize("pad", [0, 7])
def test_left_padding_matches_the_old_copy(pad):
    for seqs in _random_batches(seed=1):
        seqs = seqs + [[]]  # an empty row is all pads
        new = left_pad(seqs, pad, torch.device("cpu"))
        old = _old_left(seqs, pad)
        assert all(a.dtype == torch.long and torch.equal(a, b) for a, b in zip(new, old))
        assert torch.equal(pad_ids(seqs, pad, side="left")[0], old[0])
    ids, mask = left_pad([[5, 6], [7]], 0, "cpu")
    assert ids.tolist() == [[5, 6], [0, 7]] and mask.tolist() == [[1, 1], [0, 1]]


def test_pads_are_real_token_positions_only():
    ids, mask = pad_ids([[1, 2, 3], [4]], 9)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert pad_ids([(1, 2), range(3, 4)], 0)[0].tolist() == [[1, 2], [3, 0]]  # any int sequences


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="at least one sequence"):
        pad_ids([], 0)
    with pytest.raises(ValueError, match="side must be one of"):
        pad_ids([[1]], 0, side="middle")
    with pytest.raises(ValueError, match="no empty ones"):
        pad_right([[1], []], 0)
