"""Shared set-up of a training run: base model, tasks, tokenized data, cached lower-layer states.

Cached states live on disk under ``<cache_dir>/states/`` keyed by (model, split layer, prompts), so repeated
runs and the baselines reuse them (computing them is the one full-depth pass over every record).
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file

from hyperlora._io import atomic_path
from hyperlora.modeling.base_model import cache_dir, load_base_model
from hyperlora.modeling.layer_split import LayerSplit, cache_lower, continue_states, stack_cached
from hyperlora.ops.precision import use_bf16
from hyperlora.tasks.format import PolicyTask, load_tasks
from hyperlora.tasks.generator import SPLITS, generate_tasks
from hyperlora.training.config import TrainConfig
from hyperlora.training.data import Item, TaskData, build_task_data, collate_options, spread_over_families


def load_train_tasks(cfg: TrainConfig) -> list[PolicyTask]:
    """The training tasks: `cfg.tasks` (JSONL), else the generated suite's train split of `cfg.families`."""
    if cfg.tasks:
        return load_tasks(cfg.tasks)
    return [t for fam in cfg.families
            for t in generate_tasks(fam, "train", cfg.train_per_family, seed=cfg.suite_seed,
                                    examples_per_task=cfg.train_examples_per_task, strict=False)]


def load_eval_tasks(cfg: TrainConfig) -> dict[str, list[PolicyTask]]:
    """split name -> tasks (a user JSONL file counts as one split, named by its tasks' `split` or 'tasks')."""
    if cfg.eval_tasks:
        out: dict[str, list[PolicyTask]] = {}
        for t in load_tasks(cfg.eval_tasks):
            out.setdefault(t.split or "tasks", []).append(t)
        return out
    return {sp: [t for fam in cfg.families
                 for t in generate_tasks(fam, sp, cfg.held_out_per_family, seed=cfg.suite_seed, examples_per_task=20,
                                         strict=False)]
            for sp in SPLITS if sp != "train"}


def _first_balanced(task: PolicyTask, n: int) -> PolicyTask:
    """The task with its first examples, round-robin over answers, at most n."""
    by: dict[str, list] = {}
    for ex in task.examples:
        by.setdefault(str(ex.answer), []).append(ex)
    out, k = [], 0
    while len(out) < n and any(k < len(v) for v in by.values()):
        for v in by.values():
            if k < len(v) and len(out) < n:
                out.append(v[k])
        k += 1
    return dataclasses.replace(task, examples=out)


def _states_key(model_id: str, start: int, prompts: Sequence[str]) -> str:
    h = hashlib.sha256(f"{model_id}|{start}|".encode())
    for p in prompts:
        h.update(p.encode())
        h.update(b"\x00")
    return h.hexdigest()[:24]


def cached_states(split: LayerSplit, data: TaskData, tokenizer: Any, cache_root: Path, model_id: str,
                  log=print) -> list[torch.Tensor]:
    """Lower-layer states of every record in `data`, from the disk cache or computed (and stored) now."""
    key = _states_key(model_id, split.start, data.records)
    path = cache_root / "states" / f"{key}.safetensors"
    if path.is_file():
        d = load_file(str(path))
        return [d[str(i)] for i in range(len(data.records))]
    t0 = time.time()
    # A cache of the same prompts at a shallower layer saves most of the work: continue from it.
    states = None
    for s0 in range(split.start - 1, 0, -1):
        p0 = cache_root / "states" / f"{_states_key(model_id, s0, data.records)}.safetensors"
        if p0.is_file():
            d = load_file(str(p0))
            states = continue_states(split, [d[str(i)] for i in range(len(data.records))], s0)
            log(f"continued cached layer-{s0} states to layer {split.start}")
            break
    if states is None:
        states = cache_lower(split, data.record_ids, tokenizer.pad_token_id or 0, progress=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # a run stopped mid-write leaves no half-written cache file
        save_file({str(i): s.contiguous() for i, s in enumerate(states)}, str(tmp))
    log(f"cached layer-{split.start} states of {len(states)} records in {time.time() - t0:.0f} s -> {path}")
    return states


@dataclass
class Session:
    cfg: TrainConfig
    model: Any
    tokenizer: Any
    split: LayerSplit
    train: TaskData | None = None
    train_states: list[torch.Tensor] = field(default_factory=list)
    evals: dict[str, TaskData] = field(default_factory=dict)
    eval_states: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    @property
    def target_names(self) -> list[str]:
        """Full names of the adapted modules: target types in the last n_upper layers."""
        out = []
        for li in range(self.split.start, len(self.split.layers)):
            for name, _ in self.split.layers[li].named_modules():
                if name.rsplit(".", 1)[-1] in self.cfg.target_modules:
                    out.append(f"model.layers.{li}.{name}")
        return out

    def forward_options(self, states: Sequence[torch.Tensor], items: Sequence[Item]) -> tuple[torch.Tensor, torch.Tensor]:
        """Option logits [N, K] (float32) and gold indices [N] for `items`, through the upper layers.

        Adapters must already be applied (apply_lora) by the caller."""
        h, last = stack_cached(states, [it.record for it in items], torch.float32, self.cfg.device)
        opt, ans = collate_options(items)
        with torch.autocast(self.split.embed.weight.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            hl = self.split.upper(h, last)
            logits = self.split.option_logits(hl, opt.to(h.device))
        return logits.float(), ans.to(h.device)


def build_session(cfg: TrainConfig, *, policy_in_prompt: bool = False, with_train: bool = True,
                  with_eval: bool = True, log=print) -> Session:
    """Load the base model, split it below the last n_upper layers, and build (and cache) the training and
    held-out data the config asks for. `cfg.bf16` is resolved here (None -> what the device runs natively)."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    cfg.bf16 = use_bf16(cfg.bf16, cfg.device)  # resolved once: what the run used is what its config records
    model, tok = load_base_model(cfg.base_model)
    model.to(cfg.device)
    n_layers = len(model.model.layers)
    if not 0 < cfg.n_upper <= n_layers:
        raise ValueError(f"config.n_upper must be in [1, {n_layers}] for this model, got {cfg.n_upper}")
    split = LayerSplit(model, n_layers - cfg.n_upper)
    s = Session(cfg, model, tok, split)
    model_id = str(cfg.base_model or "default")
    root = cache_dir()
    if with_train:
        tasks = load_train_tasks(cfg)
        if policy_in_prompt and cfg.multitask_examples_per_task > 0:
            tasks = [_first_balanced(t, cfg.multitask_examples_per_task) for t in tasks]
        s.train = build_task_data(tasks, tok, policy_in_prompt=policy_in_prompt)
        log(f"train: {len(s.train.usable_tasks)} option tasks, {len(s.train.records)} distinct prompts, "
            f"{s.train.skipped} examples skipped (free text or options sharing a first token)")
        s.train_states = cached_states(split, s.train, tok, root, model_id, log)
    if with_eval:
        for name, tasks in load_eval_tasks(cfg).items():
            if policy_in_prompt:  # only the policies quick evals score (prompts with a policy cost a full forward)
                tasks = [tasks[i] for i in spread_over_families(build_task_data(tasks, tok), cfg.eval_tasks_per_split)]
            d = build_task_data(tasks, tok, policy_in_prompt=policy_in_prompt)
            if not d.usable_tasks:
                continue
            s.evals[name] = d
            s.eval_states[name] = cached_states(split, d, tok, root, model_id, log)
    return s
