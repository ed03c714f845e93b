"""`hyperlora train` configuration: one dataclass == the JSON config file; CLI flags override fields."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("sft", "reader", "rule_heads", "reconstruct", "multitask_lora", "oracle_lora")


@dataclass
class TrainConfig:
    """Everything a training run depends on. Saved as ``train_config.json`` next to its checkpoints."""

    method: str = "sft"
    # data: a JSONL task file, or (None) the generated suite's train split
    tasks: str | None = None
    eval_tasks: str | None = None          # JSONL of held-out tasks; None = generated held-out splits
    suite_seed: int = 0
    train_per_family: int = 120
    train_examples_per_task: int = 8       # records per training policy (each costs one full forward to cache)
    held_out_per_family: int = 8
    families: list[str] = field(default_factory=lambda: ["topic", "routing", "conjunction", "threshold"])
    # base model and adapter placement
    base_model: str | None = None
    n_upper: int = 12                      # adapt only the last n_upper decoder layers (lower ones cached)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    rank: int = 8
    lora_alpha: float = 16.0
    # hypernetwork
    latent_dim: int = 32
    hidden_dim: int = 256
    task_proj_dim: int = 64
    trunk_layers: int = 2
    encoder: str = "minilm"                # minilm | base_mean | base_attn (hyperlora.hypernets.t2l.text_encoders)
    encoder_layer: int = 15
    encoder_queries: int = 4
    # policy reader (--method reader, hyperlora/reader.py)
    reader_gate_layer: int = 20            # base-model layer whose states feed the reader's gate/attention
    reader_aux: float = 3.0                # weight of the gate loss where a training rule is known
    reader_lr_u: float = 3e-4              # lr of the identity-initialised key maps
    reader_u_reg: float = 1e-3             # pull of the key maps towards the identity
    reader_harm: float = 0.0               # weight of the change the adapter makes away from the answer position
    reader_init: str | None = None         # start from this trained reader directory (fine-tuning)
    reader_clause_keys: bool = False       # routed answer words' keys from their own clause read alone (clause_keys.py), in training and serving
    rule_extra_threshold: int = 480        # --method rule_heads: extra threshold training policies for its pointers
    reader_tail: float = 0.0               # weight of the CE of the answer's later tokens + end of turn (as eval scores)
    reader_tail_all_options: bool = False  # the tail loss also on every non-gold option's continuation
    reader_free_text: float = 0.0          # weight of the CE of format tasks' reference replies (needs "format" in families)
    reader_free_text_policies: int = 4     # format policies per step (x examples_per_policy replies each)
    reader_free_text_edge: int | None = 5  # score only a reply's first and last this many tokens (None = all)
    # optimisation
    steps: int = 400
    lr: float = 1e-3
    weight_decay: float = 0.0
    emb_dropout: float = 0.0               # dropout on the policy embedding fed to the trunk (training only)
    save_best: bool = False                # also save <out>/best/ at the best quick eval (early stopping)
    warmup: int = 20
    grad_clip: float = 1.0
    policies_per_step: int = 8
    examples_per_policy: int = 4
    contrastive: float = 0.5
    extra_policies_per_family: int = 0     # >0 (needs relabel_per_task): more topic/routing train policies,
                                           # trained only on relabelled cached records
    extra_word_swap: float = 0.0           # share of those extra policies whose answer words are swapped for
                                           # training-only words (hyperlora/tasks/word_swap.py)
    relabel_per_task: int = 0              # >0: add that many relabelled records to topic/routing policies
    loss: str = "options"                  # options: softmax over the options' first-token logits
    time_budget_s: float | None = None     # stop after this many seconds of training (then save)
    # baselines
    multitask_examples_per_task: int = 4   # records per policy for multitask_lora (policy-in-prompt prompts
                                           # share no prefix, so each costs a full forward to cache)
    oracle_steps: int = 60
    oracle_lr: float = 1e-3
    oracle_train_fraction: float = 0.5
    oracle_tasks_per_split: int = 8
    # reconstruction (--method reconstruct, hyperlora/training/reconstruct.py)
    lora_library: str | None = None        # DIR/<name>/{adapter_config.json, adapter_model.safetensors, policy.txt}
    build_library: bool = False            # first train one oracle LoRA per training task into lora_library
                                           # (default <out>/library; oracle_steps / oracle_lr), then reconstruct
    library_size: int | None = None        # build at most this many (round-robin over families); None = all
    library_holdout: int = 0               # library LoRAs kept out of training, reported as held_out
    init_hypernet: str | None = None       # sft / reconstruct: start from this saved hypernetwork (e.g. a
                                           # reconstruct run's <out>/final) instead of the T2L init
    # bookkeeping
    eval_every: int = 100
    eval_tasks_per_split: int = 16
    save_every: int = 50
    bf16: bool | None = None               # bfloat16 autocast; None = where the device runs it natively
    threads: int = 1                       # 1 is ~3x faster than 2 on the shared 2-core machine
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/sft"

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.loss != "options":
            raise ValueError(f"loss must be 'options' (softmax over the options' first tokens), got {self.loss!r}")
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
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
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
