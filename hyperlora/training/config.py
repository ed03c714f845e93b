"""`hyperlora train` configuration: one dataclass == the JSON config file; CLI flags override fields."""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("sft", "reader", "rule_heads", "reconstruct", "multitask_lora", "multitask_sft", "oracle_lora")


def _f(default: Any, help: str) -> Any:
    """A config field with a one-line help text (``hyperlora train --list-fields`` prints them)."""
    if isinstance(default, list):
        return field(default_factory=lambda d=tuple(default): list(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# Settings of where and how long a run goes, not of what it computes: never saved into a checkpoint's recipe.
RUN_ONLY = ("threads", "device", "out", "time_budget_s")

# Keys older configs and checkpoints may hold, and why they are gone: loading one warns and drops it.
RETIRED = {
    "loss": "the only loss was 'options' (softmax over the options' first tokens); the field was never read",
}


@dataclass
class TrainConfig:
    """Everything a training run depends on. Saved as ``train_config.json`` next to its checkpoints (without
    the run-only settings in ``RUN_ONLY``)."""

    method: str = _f("sft", f"what to train: one of {', '.join(METHODS)}")
    # data: a JSONL task file, or (None) the generated suite's train split
    tasks: str | None = _f(None, "training tasks JSONL; null = the generated suite's train split")
    eval_tasks: str | None = _f(None, "held-out tasks JSONL; null = the generated held-out splits")
    suite_seed: int = _f(0, "seed of the generated task suite")
    train_per_family: int = _f(120, "generated training policies per family")
    train_examples_per_task: int = _f(8, "records per training policy (each costs one full forward to cache)")
    held_out_per_family: int = _f(8, "generated held-out policies per family and split")
    families: list[str] = _f(["topic", "routing", "conjunction", "threshold"], "task families of the generated suite")
    # base model and adapter placement
    base_model: str | None = _f(None, "base model directory or id; null = the embedded SmolLM2")
    n_upper: int = _f(12, "adapt only the last n_upper decoder layers (the lower ones are cached)")
    target_modules: list[str] = _f(["q_proj", "v_proj"], "module types adapted in those layers")
    rank: int = _f(8, "LoRA rank of the generated / trained adapters")
    lora_alpha: float = _f(16.0, "LoRA alpha (scale = lora_alpha / rank)")
    # hypernetwork
    latent_dim: int = _f(32, "hypernetwork: latent size of the generated factors")
    hidden_dim: int = _f(256, "hypernetwork: trunk width")
    task_proj_dim: int = _f(64, "hypernetwork: size of the projected policy embedding")
    trunk_layers: int = _f(2, "hypernetwork: trunk depth")
    encoder: str = _f("minilm", "policy text encoder: minilm | base_mean | base_attn (hypernets/t2l/text_encoders.py)")
    encoder_layer: int = _f(15, "base_mean / base_attn: base-model layer whose states encode the policy")
    encoder_queries: int = _f(4, "base_attn: learned attention queries")
    # policy reader (--method reader, hypernets/reader/)
    reader_gate_layer: int = _f(20, "reader: base-model layer whose states feed the gate/attention")
    reader_aux: float = _f(3.0, "reader: weight of the gate loss where a training rule is known")
    reader_lr_u: float = _f(3e-4, "reader: learning rate of the identity-initialised key maps")
    reader_u_reg: float = _f(1e-3, "reader: pull of the key maps towards the identity")
    reader_harm: float = _f(0.0, "reader: weight of the change the adapter makes away from the answer position")
    reader_init: str | None = _f(None, "reader / rule_heads: start from this trained reader directory")
    reader_clause_keys: bool = _f(False, "reader: routed answer words' keys from their own clause read alone "
                                         "(clause_keys.py), in training and serving")
    rule_extra_threshold: int = _f(480, "rule_heads: extra threshold training policies for its pointers")
    reader_tail: float = _f(0.0, "reader: weight of the CE of the answer's later tokens + end of turn")
    reader_tail_all_options: bool = _f(False, "reader: the tail loss also on every non-gold option's continuation")
    reader_free_text: float = _f(0.0, "reader: weight of the CE of format tasks' reference replies "
                                      "(needs 'format' in families)")
    reader_free_text_policies: int = _f(4, "reader: format policies per step (x examples_per_policy replies)")
    reader_free_text_edge: int | None = _f(5, "reader: score only a reply's first and last this many tokens "
                                              "(null = all)")
    # optimisation
    steps: int = _f(400, "training steps")
    lr: float = _f(1e-3, "peak learning rate (warmup, then cosine to 0.1x)")
    weight_decay: float = _f(0.0, "sft / multitask_lora: AdamW weight decay")
    emb_dropout: float = _f(0.0, "sft: dropout on the policy embedding fed to the trunk (training only)")
    save_best: bool = _f(False, "sft: also save <out>/best/ at the best quick eval (early stopping)")
    warmup: int = _f(20, "learning-rate warmup steps")
    grad_clip: float = _f(1.0, "gradient-norm clip (0 = none)")
    policies_per_step: int = _f(8, "policies (adapters) per training step")
    examples_per_policy: int = _f(4, "records per policy per step")
    contrastive: float = _f(0.5, "share of a policy's records reused from another policy of the batch")
    extra_policies_per_family: int = _f(0, ">0 (needs relabel_per_task): more topic/routing training policies, "
                                           "trained only on relabelled cached records")
    extra_word_swap: float = _f(0.0, "share of those extra policies whose answer words are swapped for "
                                     "training-only words (tasks/word_swap.py)")
    relabel_per_task: int = _f(0, ">0: add that many relabelled records to topic/routing policies")
    time_budget_s: float | None = _f(None, "stop after this many seconds of training (then save); run-only")
    # baselines
    multitask_examples_per_task: int = _f(4, "multitask_lora: records per policy (policy-in-prompt prompts share "
                                             "no prefix, so each costs a full forward to cache)")
    oracle_steps: int = _f(60, "oracle_lora / build_library: training steps per oracle LoRA")
    oracle_lr: float = _f(1e-3, "oracle_lora / build_library: oracle LoRA learning rate")
    oracle_train_fraction: float = _f(0.5, "oracle_lora: share of each held-out policy's records it trains on")
    oracle_tasks_per_split: int = _f(8, "oracle_lora: held-out policies per split that get an oracle LoRA")
    # reconstruction (--method reconstruct, training/reconstruct.py)
    lora_library: str | None = _f(None, "reconstruct: DIR/<name>/{adapter_config.json, adapter_model.safetensors, "
                                        "policy.txt}")
    build_library: bool = _f(False, "reconstruct: first train one oracle LoRA per training task into lora_library "
                                    "(default <out>/library; oracle_steps / oracle_lr)")
    library_size: int | None = _f(None, "reconstruct: build at most this many (round-robin over families); "
                                        "null = all")
    library_holdout: int = _f(0, "reconstruct: library LoRAs kept out of training, reported as held_out")
    init_hypernet: str | None = _f(None, "sft / reconstruct: start from this saved hypernetwork (e.g. a "
                                         "reconstruct run's <out>/final) instead of the T2L init")
    # bookkeeping
    eval_every: int = _f(100, "quick held-out eval every this many steps (0 = never)")
    eval_tasks_per_split: int = _f(16, "policies per held-out split in the quick eval")
    save_every: int = _f(50, "checkpoint every this many steps (0 = only at the end)")
    bf16: bool | None = _f(None, "bfloat16 autocast; null = where the device runs it natively")
    threads: int = _f(1, "torch threads (1 is ~3x faster than 2 on the shared 2-core machine); run-only")
    seed: int = _f(0, "seed of initialisation and batches")
    device: str = _f("cpu", "torch device; run-only")
    out: str = _f("runs/sft", "output directory (checkpoints, logs, results); run-only")

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("n_upper", "rank", "steps", "policies_per_step", "examples_per_policy", "threads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"config.{name} must be a positive int, got {v!r}")
        if not 0.0 <= self.emb_dropout < 1.0:
            raise ValueError(f"config.emb_dropout must be in [0, 1), got {self.emb_dropout}")
        if not 0.0 <= self.extra_word_swap <= 1.0:
            raise ValueError(f"config.extra_word_swap must be in [0, 1], got {self.extra_word_swap}")
        if self.extra_word_swap > 0 and self.extra_policies_per_family <= 0:
            raise ValueError("config.extra_word_swap > 0 needs extra_policies_per_family > 0 (it swaps their words)")
        if not 0.0 <= self.contrastive <= 1.0:
            raise ValueError(f"config.contrastive must be in [0, 1], got {self.contrastive}")
        if self.library_size is not None and (not isinstance(self.library_size, int) or self.library_size <= 0):
            raise ValueError(f"config.library_size must be a positive int or null, got {self.library_size!r}")
        if not isinstance(self.library_holdout, int) or self.library_holdout < 0:
            raise ValueError(f"config.library_holdout must be an int >= 0, got {self.library_holdout!r}")
        if not 0.0 < self.oracle_train_fraction < 1.0:
            raise ValueError(f"config.oracle_train_fraction must be in (0, 1), got {self.oracle_train_fraction}")

    def to_dict(self) -> dict[str, Any]:
        """Every field (run-only settings included)."""
        return dataclasses.asdict(self)

    def recipe(self) -> dict[str, Any]:
        """The fields that decide what a run computes: `to_dict` without the run-only settings (`RUN_ONLY`).
        What checkpoints and ``train_config.json`` record."""
        return {k: v for k, v in self.to_dict().items() if k not in RUN_ONLY}

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Field name -> its one-line help text (default and run-only mark included)."""
        out = {}
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out[f.name] = f"{f.metadata.get('help', '')} (default {json.dumps(default)})"
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """A validated config from a dict of fields. Retired keys (`RETIRED`) are dropped with a warning naming
        them; any other unknown key is a ValueError listing the known fields."""
        known = {f.name for f in dataclasses.fields(cls)}
        d = dict(d)
        for key in sorted(set(d) & set(RETIRED)):
            warnings.warn(f"training config key {key!r} is retired and ignored: {RETIRED[key]}", stacklevel=2)
            del d[key]
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config fields {unknown}; known fields: {sorted(known)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"training config {str(p)!r} does not exist (see hyperlora/training/configs/)")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"training config {str(p)!r} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)
