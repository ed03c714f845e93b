"""training/checkpointing.py: one save/resume for every resumable trainer; saves are atomic."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hyperlora.training.checkpointing import CHECKPOINT, STATE_FILE, load_checkpoint, save_checkpoint


def _trained(seed: int = 0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        lin(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    return lin, opt


def _weights_io(lin):
    from safetensors.torch import load_file, save_file

    def save(d: Path) -> None:
        save_file({k: v.contiguous() for k, v in lin.state_dict().items()}, str(d / "w.safetensors"))

    def load(d: Path) -> None:
        lin.load_state_dict(load_file(str(d / "w.safetensors")))

    return save, load


def test_round_trip_restores_weights_moments_step_and_history(tmp_path):
    lin, opt = _trained()
    save, _ = _weights_io(lin)
    params = dict(lin.named_parameters())
    ck = save_checkpoint(tmp_path, save, opt, params, 3, 12.34, {"lr": 1e-2}, [{"step": 3}])
    assert ck == tmp_path / CHECKPOINT
    state = json.loads((ck / STATE_FILE).read_text())
    assert state == {"step": 3, "elapsed_s": 12.3, "config": {"lr": 1e-2}, "history": [{"step": 3}]}

    fresh = torch.nn.Linear(4, 3)
    fopt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    _, load = _weights_io(fresh)
    step, elapsed, hist = load_checkpoint(tmp_path, load, fopt, dict(fresh.named_parameters()))
    assert (step, elapsed, hist) == (3, 12.3, [{"step": 3}])
    for (n, p), q in zip(lin.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][k], fopt.state[q][k]), (n, k)
        assert float(fopt.state[q]["step"]) == 3.0


def test_no_checkpoint_resumes_nothing_and_touches_nothing(tmp_path):
    lin, opt = _trained()
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    called = []
    assert load_checkpoint(tmp_path, called.append, opt, dict(lin.named_parameters())) == (0, 0.0, [])
    assert not called and all(torch.equal(before[k], v) for k, v in lin.state_dict().items())


def test_a_failed_save_leaves_the_previous_checkpoint_and_no_temporary_files(tmp_path):
    lin, opt = _trained()
    save, _ = _weights_io(lin)
    params = dict(lin.named_parameters())
    save_checkpoint(tmp_path, save, opt, params, 3, 1.0, {}, [])
    before = {p.name: p.read_bytes() for p in (tmp_path / CHECKPOINT).iterdir()}

    def broken(d: Path) -> None:
        (d / "w.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, broken, opt, params, 4, 2.0, {}, [])
    assert {p.name: p.read_bytes() for p in (tmp_path / CHECKPOINT).iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]  # no temporary directory left behind
