"""Training checkpoints: one save and one resume for every resumable trainer (sft, reconstruct, reader), and
starting a hypernetwork from a saved one (`init_from`).

``<out>/checkpoint/`` holds the trained weights (written by the trainer's own ``save_weights``), the AdamW
moments (``optimizer.safetensors``, keys ``<param name>::exp_avg`` / ``::exp_avg_sq``) and
``training_state.json`` (step, seconds trained, the config's recipe, the history). The directory is written
beside the target and swapped in whole (`hyperlora._io.atomic_dir`), so an interrupted save leaves the previous
checkpoint as it was.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hyperlora._io import atomic_dir
from hyperlora.hypernets.t2l.hypernet import HyperNetwork
from hyperlora.hypernets.t2l.text_encoders import ENCODER_CONFIG, ENCODER_WEIGHTS

__all__ = ["CHECKPOINT", "STATE_FILE", "MOMENTS_FILE", "save_checkpoint", "load_checkpoint", "init_from"]

CHECKPOINT = "checkpoint"
STATE_FILE = "training_state.json"
MOMENTS_FILE = "optimizer.safetensors"
_MOMENTS = ("exp_avg", "exp_avg_sq")


def save_checkpoint(out: str | Path, save_weights: Callable[[Path], None], opt: torch.optim.Optimizer,
                    params: Mapping[str, nn.Parameter], step: int, elapsed: float, recipe: Mapping[str, Any],
                    history: list) -> Path:
    """Write ``<out>/checkpoint`` atomically: ``save_weights(directory)`` writes the model files, then the
    optimizer moments of `params` (name -> parameter, the names the moments are stored under) and the training
    state. Returns the checkpoint directory."""
    ck = Path(out) / CHECKPOINT
    with atomic_dir(ck) as tmp:
        save_weights(tmp)
        moments = {}
        for name, p in params.items():
            st = opt.state.get(p, {})
            for k in _MOMENTS:
                if k in st:
                    moments[f"{name}::{k}"] = st[k].detach().cpu().contiguous()
        save_file(moments, str(tmp / MOMENTS_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(
            {"step": step, "elapsed_s": round(elapsed, 1), "config": dict(recipe), "history": history}, indent=1))
    return ck


def load_checkpoint(out: str | Path, load_weights: Callable[[Path], None], opt: torch.optim.Optimizer,
                    params: Mapping[str, nn.Parameter]) -> tuple[int, float, list]:
    """Resume from ``<out>/checkpoint`` if it holds a training state: ``load_weights(directory)`` restores the
    model, the AdamW moments of `params` are put back (with the step count). Returns (step, seconds trained,
    history); (0, 0.0, []) and nothing touched when there is no checkpoint."""
    ck = Path(out) / CHECKPOINT
    if not (ck / STATE_FILE).is_file():
        return 0, 0.0, []
    state = json.loads((ck / STATE_FILE).read_text())
    step = int(state["step"])
    load_weights(ck)
    moments = load_file(str(ck / MOMENTS_FILE))
    for name, p in params.items():
        if f"{name}::exp_avg" in moments:
            opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": moments[f"{name}::exp_avg"],
                            "exp_avg_sq": moments[f"{name}::exp_avg_sq"]}
    return step, float(state.get("elapsed_s", 0.0)), list(state.get("history", []))


def init_from(hn: HyperNetwork, enc: Any, directory: str | Path, log: Callable[[str], None] = print) -> None:
    """Copy the weights of a saved hypernetwork (and its trainable encoder) into `hn` / `enc`, e.g. to start
    SFT from a reconstruction run's `<out>/final`. Raises ValueError naming what differs."""
    d = Path(directory)
    src = HyperNetwork.from_pretrained(d)
    c0, c1 = src.config.to_dict(), hn.config.to_dict()
    diff = [k for k in c1 if k not in ("base_model_name_or_path",) and c0.get(k) != c1[k]]
    if diff:
        raise ValueError(f"init_hypernet {str(d)!r} does not match this run's hypernetwork: fields {diff} differ "
                         f"(e.g. {diff[0]}: saved {c0.get(diff[0])!r}, this run {c1[diff[0]]!r}); use the same "
                         f"rank / latent_dim / hidden_dim / n_upper / target_modules / encoder settings")
    hn.load_state_dict(src.state_dict())
    if (d / ENCODER_CONFIG).is_file():
        kind = json.loads((d / ENCODER_CONFIG).read_text()).get("kind")
        if kind != enc.kind:
            raise ValueError(f"init_hypernet {str(d)!r} was trained with encoder {kind!r}, this run uses {enc.kind!r}")
    if enc.module is not None and (d / ENCODER_WEIGHTS).is_file():
        enc.module.load_state_dict(load_file(str(d / ENCODER_WEIGHTS)))
    log(f"initialised the hypernetwork from {d}")
