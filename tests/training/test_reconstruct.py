"""Reconstruction training (hyperlora/training/reconstruct.py): loss, library reading, training, resume, building."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.training.test_train import TINY_TASKS, _run, tiny_model  # noqa: F401  (fixture)

POLICIES = ["Answer 'flag' if the message asks for a refund; otherwise answer 'pass'.",
            "Route billing questions to 'finance', everything else to 'support'.",
            "Say 'urgent' when the customer threatens to cancel, else 'normal'."]


def _cfg(tiny_model, out, **kw):
    from hyperlora.training.config import TrainConfig

    d = dict(method="reconstruct", base_model=str(tiny_model), n_upper=2, encoder="base_mean", encoder_layer=1,
             out=str(out), bf16=False, eval_every=0, save_every=0, policies_per_step=3, threads=1)
    d.update(kw)
    return TrainConfig.from_dict(d)


@pytest.fixture(scope="module")
def session(tiny_model):
    from hyperlora.training.session import build_session

    torch.set_num_threads(1)
    return build_session(_cfg(tiny_model, "unused"), with_train=False, with_eval=False, log=lambda m: None)


def _targets(session):
    from hyperlora.training.sft import build_hypernet

    return build_hypernet(session, 32).targets()


def _write_lora(d: Path, modules, policy: str | None, rank: int = 4, alpha: float = 8.0):
    from hyperlora.adapters.peft_io import write_peft

    write_peft(d, modules, rank=rank, lora_alpha=alpha)
    if policy is not None:
        (d / "policy.txt").write_text(policy + "\n")
    return d


def _random_modules(targets, rank=4, seed=0, std_b=0.3):
    g = torch.Generator().manual_seed(seed)
    return {n: ((torch.rand(rank, d_in, generator=g) * 2 - 1) / d_in ** 0.5,
                torch.randn(d_out, rank, generator=g) * std_b) for n, (d_in, d_out) in targets.items()}


def _random_library(root: Path, targets, n=3):
    for i in range(n):
        _write_lora(root / f"lora{i}", _random_modules(targets, seed=100 + i), POLICIES[i])
    return root


# ---- the loss ------------------------------------------------------------------------------------

def test_delta_sq_error_matches_explicit_product():
    from hyperlora.training.reconstruct import delta_sq_error

    torch.manual_seed(1)
    a_g, b_g = torch.randn(2, 3, 5, 13, dtype=torch.float64), torch.randn(2, 3, 7, 5, dtype=torch.float64)
    a_t, b_t = torch.randn(2, 3, 2, 13, dtype=torch.float64), torch.randn(2, 3, 7, 2, dtype=torch.float64)
    ref = ((b_g @ a_g - b_t @ a_t) ** 2).sum((-1, -2))
    # float64, Gram-matrix form vs the explicit product: only summation order differs (values ~1e2-1e3)
    torch.testing.assert_close(delta_sq_error(a_g, b_g, a_t, b_t), ref, rtol=1e-10, atol=1e-10)
    assert float(delta_sq_error(a_t, b_t, a_t, b_t).abs().max()) < 1e-9  # measured exactly 0


def test_loss_is_invariant_to_reparametrizing_the_target(session, tmp_path):
    """A target LoRA stored as (M A, B M^-1) gives the same loss; a direct A/B regression would not."""
    from hyperlora.training.reconstruct import LibraryTargets, load_library
    from hyperlora.training.sft import build_hypernet

    torch.manual_seed(2)
    hn = build_hypernet(session, 32)
    with torch.no_grad():  # a hypernetwork that writes a non-zero adapter, so the cross term matters
        for p in hn.head_b.values():
            p.normal_(std=0.05)
    targets = hn.targets()
    mods = _random_modules(targets, seed=7)
    M = torch.randn(4, 4) + 3 * torch.eye(4)
    Minv = torch.linalg.inv(M)
    mods2 = {n: (M @ a, b @ Minv) for n, (a, b) in mods.items()}
    _write_lora(tmp_path / "one" / "x", mods, POLICIES[0])
    _write_lora(tmp_path / "two" / "x", mods2, POLICIES[0])
    emb = torch.randn(1, 32)
    losses, ab_mse = [], []
    for which in ("one", "two"):
        entries = load_library(tmp_path / which, targets)
        lib = LibraryTargets(entries, hn)
        with torch.no_grad():
            losses.append(float(lib.loss(hn, emb, [0])[0]))
        ab_mse.append(sum(float((a ** 2).sum() + (b ** 2).sum()) for a, b in entries[0].modules.values()))
    assert losses[0] > 0.05
    # float32 targets pushed through M and M^-1 (condition ~2): measured 1.2e-7 relative
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert abs(ab_mse[0] - ab_mse[1]) > 0.1 * ab_mse[0]  # the factors themselves differ a lot


# ---- training --------------------------------------------------------------------------------------

def test_reconstruction_reduces_the_error(session, tmp_path):
    import dataclasses

    from hyperlora.training.reconstruct import LibraryTargets, load_library, train_reconstruct

    lib_dir = _random_library(tmp_path / "lib", _targets(session))
    run = dataclasses.replace(session, cfg=dataclasses.replace(session.cfg, out=str(tmp_path / "out"), steps=80,
                                                               lr=3e-3, warmup=3))
    logs: list[str] = []
    hn, enc, report, history = train_reconstruct(run, lib_dir, log=logs.append, resume=False)
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[0] > 0.9  # a fresh hypernetwork writes B = 0: a no-op adapter scores ~1
    assert losses[3] < 0.85 * losses[0], losses  # step 30
    assert losses[-1] < 0.5 * losses[0], losses
    # the generated delta_W of a fixed policy moved toward its target ...
    entries = load_library(lib_dir, hn.targets())
    lib = LibraryTargets(entries, hn)
    from hyperlora.training.sft import build_hypernet

    torch.manual_seed(0)
    fresh = build_hypernet(session, enc.dim)
    emb = enc.encode([entries[1].policy])
    before = float(lib.relative_error(fresh, emb, [1])[0])
    after = float(lib.relative_error(hn, emb, [1])[0])
    assert before == pytest.approx(1.0, abs=1e-6)
    # ... closer than the best adapter that ignores the policy (the library's mean delta_W) can get
    dw = {n: [b @ a for a, b in (e.modules[n] for e in entries)] for n in entries[1].modules}
    mean_err = sum(float(((w[1] - sum(w) / 3) ** 2).sum()) for w in dw.values())
    floor = mean_err / sum(float((w[1] ** 2).sum()) for w in dw.values())
    assert after < 0.8 * floor < 0.8, (before, after, floor)
    assert report["train"]["n"] == 3 and report["train"]["rel_error"] < 0.5


def test_cli_checkpoints_resumes_and_final_loads(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERLORA_CACHE", str(tmp_path / "cache"))
    from hyperlora.hypernets.t2l.hypernet import HyperNetwork
    from hyperlora.modeling.base_model import load_base_model
    from hyperlora.evaluation.sources import HypernetSource

    model, tok = load_base_model(tiny_model)
    out = tmp_path / "rec"
    # the library: built for the same modules the run's hypernetwork generates (layers 1-2, q/v)
    from hyperlora.training.session import build_session

    s = build_session(_cfg(tiny_model, out), with_train=False, with_eval=False, log=lambda m: None)
    lib = _random_library(tmp_path / "lib", _targets(s))
    args = ["--method", "reconstruct", "--out", str(out), "--set", f"lora_library=\"{lib}\"",
            "--set", f"base_model=\"{tiny_model}\"", "--set", "n_upper=2", "--set", "encoder=\"base_mean\"",
            "--set", "encoder_layer=1", "--set", "save_every=2", "--set", "eval_every=2",
            "--set", "policies_per_step=2", "--set", "library_holdout=1", "--threads", "1"]
    assert _run([*args, "--steps", "2"]) == 0
    assert json.loads((out / "checkpoint" / "training_state.json").read_text())["step"] == 2
    assert _run([*args, "--steps", "4"]) == 0
    assert json.loads((out / "checkpoint" / "training_state.json").read_text())["step"] == 4
    assert "resumed from" in (out / "log.txt").read_text()
    res = json.loads((out / "results.json").read_text())
    rep = res["eval"]["library"]
    assert res["method"] == "reconstruct" and rep["train"]["n"] == 2 and rep["held_out"]["n"] == 1
    hn = HyperNetwork.from_pretrained(out / "final", model=model)
    assert float(hn.head("q_proj")[1].detach().abs().sum()) > 0  # trained off the zero init
    src = HypernetSource.from_dir(out / "final", model, tok)  # what `hyperlora eval --hypernet` loads
    ad = src(["Say 'ok'."])
    assert set(ad.modules) == set(hn.targets())
    # a later sft run starts from it
    sft_out = tmp_path / "sft"
    assert _run(["--tasks", str(TINY_TASKS), "--eval-tasks", str(TINY_TASKS), "--out", str(sft_out),
                 "--set", f"base_model=\"{tiny_model}\"", "--set", "n_upper=2", "--set", "encoder=\"base_mean\"",
                 "--set", "encoder_layer=1", "--set", "eval_every=0", "--set", "policies_per_step=2",
                 "--set", "examples_per_policy=2", "--set", "bf16=false", "--steps", "1",
                 "--set", f"init_hypernet=\"{out / 'final'}\""]) == 0
    assert "initialised the hypernetwork from" in (sft_out / "log.txt").read_text()


def test_reconstruct_without_a_library_is_a_clear_error(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="lora_library"):
        _run(["--method", "reconstruct", "--out", str(tmp_path / "x"), "--set", f"base_model=\"{tiny_model}\""])
    from hyperlora.training.config import TrainConfig

    with pytest.raises(ValueError, match="library_size"):
        TrainConfig.from_dict({"library_size": 0})
    with pytest.raises(ValueError, match="library_holdout"):
        TrainConfig.from_dict({"library_holdout": -1})


# ---- library errors ------------------------------------------------------------------------------

def test_library_errors_name_the_entry(session, tmp_path):
    from hyperlora.training.reconstruct import load_library

    targets = _targets(session)
    good = _random_modules(targets)
    with pytest.raises(ValueError, match="holds no LoRA subdirectories"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "README").write_text("files are ignored")
        load_library(tmp_path / "empty", targets)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_library(tmp_path / "nope", targets)

    root = tmp_path / "nopolicy"
    _write_lora(root / "a", good, POLICIES[0])
    _write_lora(root / "b", good, None)
    with pytest.raises(ValueError, match=r"entry '.*nopolicy/b'.*policy\.txt is missing"):
        load_library(root, targets)

    root = tmp_path / "blank"
    _write_lora(root / "a", good, "   \n")
    with pytest.raises(ValueError, match=r"entry '.*blank/a'.*policy\.txt' is empty"):
        load_library(root, targets)

    root = tmp_path / "dora"
    d = _write_lora(root / "a", good, POLICIES[0])
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"entry '.*dora/a'.*DoRA"):
        load_library(root, targets)

    root = tmp_path / "noweights"
    (root / "a").mkdir(parents=True)
    (root / "a" / "policy.txt").write_text(POLICIES[0])
    with pytest.raises(FileNotFoundError, match=r"entry '.*noweights/a'.*adapter_model.safetensors is missing"):
        load_library(root, targets)

    root = tmp_path / "layer0"  # layer 0 is below the hypernetwork's n_upper=2 layers
    extra = dict(good)
    extra["model.layers.0.self_attn.q_proj"] = good["model.layers.1.self_attn.q_proj"]
    _write_lora(root / "a", extra, POLICIES[0])
    with pytest.raises(ValueError, match=r"entry '.*layer0/a'.*layers.0.self_attn.q_proj.*not generated"):
        load_library(root, targets)

    root = tmp_path / "shape"
    bad = dict(good)
    n = "model.layers.2.self_attn.v_proj"
    bad[n] = (good[n][0], torch.randn(good[n][1].shape[0] + 3, 4))
    _write_lora(root / "a", bad, POLICIES[0])
    with pytest.raises(ValueError, match=r"entry '.*shape/a'.*layers.2.self_attn.v_proj.*another base model"):
        load_library(root, targets)


def test_partial_lora_counts_missing_modules_as_zero(session, tmp_path):
    from hyperlora.training.reconstruct import LibraryTargets, load_library
    from hyperlora.training.sft import build_hypernet

    hn = build_hypernet(session, 32)
    targets = hn.targets()
    q_only = {n: ab for n, ab in _random_modules(targets).items() if n.endswith("q_proj")}
    _write_lora(tmp_path / "lib" / "a", q_only, POLICIES[0])
    _write_lora(tmp_path / "lib" / "b", _random_modules(targets, seed=3), POLICIES[1])
    lib = LibraryTargets(load_library(tmp_path / "lib", targets), hn)
    assert float(lib.b["v_proj"][0].abs().sum()) == 0.0 and float(lib.b["v_proj"][1].abs().sum()) > 0
    with torch.no_grad():
        loss = lib.loss(hn, torch.randn(2, 32), [0, 1])[0]
    assert float(loss) == pytest.approx(1.0, rel=1e-5)  # fresh hypernetwork = no-op: exactly the mean energy


# ---- building a library ------------------------------------------------------------------------------

def test_built_library_round_trips_through_read_peft(session, tmp_path):
    from hyperlora.adapters.peft_io import read_peft
    from hyperlora.tasks.format import load_tasks
    from hyperlora.training.reconstruct import build_library, load_library

    tasks = [t for t in load_tasks(TINY_TASKS) if not t.is_free_text][:2]
    names = session.target_names
    dirs = build_library(session.model, session.tokenizer, tasks, tmp_path / "lib", module_names=names, rank=4,
                         alpha=8.0, steps=2, lr=1e-2, bf16=False, log=lambda m: None)
    assert len(dirs) == 2
    targets = _targets(session)
    for d, t in zip(dirs, tasks):
        ad = read_peft(d, targets=targets, max_rank=8)
        assert set(ad.modules) == set(names)
        assert any(float(b.abs().sum()) > 0 for _, b in ad.modules.values())  # trained B moved off zero
        assert (d / "policy.txt").read_text().strip() == t.policy.strip()
    entries = load_library(tmp_path / "lib", targets)
    assert [e.policy for e in entries] == [t.policy.strip() for t in tasks]
    # rebuilding keeps finished entries (resumable): same bytes
    before = [(d / "adapter_model.safetensors").read_bytes() for d in dirs]
    build_library(session.model, session.tokenizer, tasks, tmp_path / "lib", module_names=names, rank=4,
                  alpha=8.0, steps=2, lr=1e-2, seed=5, bf16=False, log=lambda m: None)
    assert [(d / "adapter_model.safetensors").read_bytes() for d in dirs] == before


def test_cli_builds_then_trains(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERLORA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bt"
    assert _run(["--method", "reconstruct", "--tasks", str(TINY_TASKS), "--out", str(out),
                 "--set", "build_library=true", "--set", "library_size=2", "--set", "oracle_steps=2",
                 "--set", f"base_model=\"{tiny_model}\"", "--set", "n_upper=2", "--set", "encoder=\"base_mean\"",
                 "--set", "encoder_layer=1", "--set", "bf16=false", "--steps", "2", "--threads", "1"]) == 0
    assert len([p for p in (out / "library").iterdir() if p.is_dir()]) == 2
    res = json.loads((out / "results.json").read_text())
    assert res["eval"]["library"]["entries"] == 2 and (out / "final" / "config.json").is_file()
