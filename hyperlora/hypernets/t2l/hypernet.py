"""The hypernetwork: a policy embedding -> one LoRA adapter (A, B) for every targeted module of a base model.

Text-to-LoRA family (Sakana AI, ICML 2025), shaped for hyperlora's latent path:

    e[p] (task embedding, [P, E]) -> task projection t[p]
    t[p] ⊕ layer_emb[l] ⊕ module_emb[m] -> MLP trunk -> z[p, l, m]   (latent, latent_dim)
    z1 = (z, 1)  (K = latent_dim + 1: the head's bias is folded in as a trailing constant coordinate)
    A[p,l,m][r, i] = sum_k z1[k] * w_a[m][r*K + k, i]      (one linear head per module type)
    B[p,l,m][o, r] = sum_k z1[k] * w_b[m][o, r*K + k]

The head is linear in z and `latent_dim` is small, so `hyperlora.ops.latent_lora` can apply an adapter
without materializing it, and `hyperlora.ops.generate_lora` can write every (policy, layer) of one module
type into the adapter pool in one launch. Initialisation follows T2L: B's head starts at zero (a fresh
hypernetwork is a no-op adapter), A's head is small and random.

Nothing is pickled: weights are safetensors and the config is JSON (== `HyperNetworkConfig`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

# Re-exported: the target-module helpers live in hyperlora.modeling.targets (one copy for every layer).
from hyperlora.modeling.targets import (find_targets, group_by_type, layer_index, linear_shape,  # noqa: F401
                                        matches_type, module_type_of, type_of_names)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "hypernet.safetensors"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Reading target modules from a base model
# --------------------------------------------------------------------------------------------------

def _pkey(module_type: str) -> str:
    """Parameter-dict key of a module type ('attn.c_proj' -> 'attn__c_proj'; parameter names cannot hold dots)."""
    return module_type.replace(".", "__")


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

@dataclass
class HyperNetworkConfig:
    """Everything that defines a hypernetwork; saved verbatim as config.json.

    module_shapes: module type -> [d_in, d_out]; module_names: module type -> full names (layer order);
    layer_indices: module type -> layer number of each name (indexes the learned layer embedding).
    scale = lora_alpha / rank is folded into B when an adapter is written to the pool.
    """

    rank: int = 8
    latent_dim: int = 32
    task_emb_dim: int = 384
    task_proj_dim: int = 64
    layer_emb_dim: int = 32
    module_emb_dim: int = 32
    hidden_dim: int = 256
    trunk_layers: int = 2
    dropout: float = 0.0
    lora_alpha: float = 16.0
    a_init_std: float | None = None  # None: uniform(+-1/sqrt(d_in)) bias part, like LoRA's kaiming A
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    module_shapes: dict[str, list[int]] = field(default_factory=dict)
    module_names: dict[str, list[str]] = field(default_factory=dict)
    layer_indices: dict[str, list[int]] = field(default_factory=dict)
    num_layers: int = 0
    base_model_name_or_path: str | None = None
    base_model_type: str | None = None
    encoder: str = "all-MiniLM-L6-v2"
    format_version: int = FORMAT_VERSION

    @property
    def scale(self) -> float:
        """LoRA scale alpha / r, folded into B when written to the pool."""
        return float(self.lora_alpha) / float(self.rank)

    @property
    def K(self) -> int:
        """Latent size with the folded bias coordinate."""
        return self.latent_dim + 1

    def validate(self) -> None:
        """Raise ValueError naming the field if the config is not usable."""
        for name in ("rank", "latent_dim", "task_emb_dim", "layer_emb_dim", "module_emb_dim", "hidden_dim",
                     "trunk_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"HyperNetworkConfig.{name} must be a positive int, got {v!r}")
        if not isinstance(self.task_proj_dim, int) or self.task_proj_dim < 0:
            raise ValueError(f"HyperNetworkConfig.task_proj_dim must be an int >= 0 (0 = no projection), "
                             f"got {self.task_proj_dim!r}")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ValueError(f"HyperNetworkConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not math.isfinite(float(self.lora_alpha)) or float(self.lora_alpha) <= 0:
            raise ValueError(f"HyperNetworkConfig.lora_alpha must be a positive finite number, got {self.lora_alpha!r}")
        if not self.target_modules:
            raise ValueError("HyperNetworkConfig.target_modules is empty")
        for t in self.target_modules:
            if t not in self.module_shapes or t not in self.module_names:
                raise ValueError(f"HyperNetworkConfig: target module type {t!r} has no module_shapes/module_names "
                                 f"entry; build the config with HyperNetwork.for_model(model, ...)")
            if len(self.module_shapes[t]) != 2 or any(int(d) <= 0 for d in self.module_shapes[t]):
                raise ValueError(f"HyperNetworkConfig.module_shapes[{t!r}] must be [d_in, d_out] > 0, "
                                 f"got {self.module_shapes[t]!r}")
            if not self.module_names[t]:
                raise ValueError(f"HyperNetworkConfig.module_names[{t!r}] is empty")
            idx = self.layer_indices.get(t)
            if idx is None or len(idx) != len(self.module_names[t]):
                raise ValueError(f"HyperNetworkConfig.layer_indices[{t!r}] must give one layer number per module name")
            if any(i < 0 or i >= self.num_layers for i in idx):
                raise ValueError(f"HyperNetworkConfig.layer_indices[{t!r}] out of range [0, {self.num_layers})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HyperNetworkConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"hypernetwork config has unknown fields {unknown} (written by a newer hyperlora?)")
        version = data.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ValueError(f"hypernetwork config format_version {version} is newer than this hyperlora "
                             f"understands ({FORMAT_VERSION}); upgrade hyperlora")
        cfg = cls(**data)
        cfg.validate()
        return cfg


# --------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------

class HyperNetwork(nn.Module):
    """Task embedding [P, E] -> LoRA adapters for every targeted module (see the module docstring).

    Parameters: `task_proj` (Linear E -> task_proj_dim, or identity), `layer_emb` [num_layers, layer_emb_dim],
    `module_emb` [n_types, module_emb_dim], `trunk` (MLP -> latent_dim), and per module type `head_a.<type>`
    [R*K, d_in] and `head_b.<type>` [d_out, R*K] (K = latent_dim + 1; last coordinate = folded bias).
    """

    def __init__(self, config: HyperNetworkConfig):
        super().__init__()
        config.validate()
        self.config = config
        c = config
        self.types: list[str] = list(c.target_modules)
        if c.task_proj_dim > 0:
            self.task_proj: nn.Module = nn.Sequential(nn.Linear(c.task_emb_dim, c.task_proj_dim), nn.LayerNorm(c.task_proj_dim))
            t_dim = c.task_proj_dim
        else:
            self.task_proj = nn.Identity()
            t_dim = c.task_emb_dim
        self.layer_emb = nn.Embedding(c.num_layers, c.layer_emb_dim)
        self.module_emb = nn.Embedding(len(self.types), c.module_emb_dim)
        self._t_dim = t_dim
        in_dim = t_dim + c.layer_emb_dim + c.module_emb_dim
        self.trunk_in = nn.Linear(in_dim, c.hidden_dim)
        blocks: list[nn.Module] = []
        for _ in range(c.trunk_layers - 1):
            blocks += [nn.SiLU(), nn.Dropout(c.dropout), nn.Linear(c.hidden_dim, c.hidden_dim)]
        blocks += [nn.SiLU(), nn.Dropout(c.dropout), nn.LayerNorm(c.hidden_dim), nn.Linear(c.hidden_dim, c.latent_dim)]
        self.trunk = nn.Sequential(*blocks)
        K, R = c.K, c.rank
        self.head_a = nn.ParameterDict()
        self.head_b = nn.ParameterDict()
        for t in self.types:
            d_in, d_out = (int(d) for d in c.module_shapes[t])
            self.head_a[_pkey(t)] = nn.Parameter(torch.empty(R * K, d_in))
            self.head_b[_pkey(t)] = nn.Parameter(torch.empty(d_out, R * K))
        self.reset_parameters()
        self._id_cache: tuple[Any, str] | None = None

    # ---- construction ------------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """T2L-style init: B heads zero (no-op adapter), A heads small: the bias coordinate like LoRA's A
        (uniform +-1/sqrt(d_in)), the z-coordinates smaller still so A varies with the policy from the start."""
        c = self.config
        nn.init.normal_(self.layer_emb.weight, std=0.5)
        nn.init.normal_(self.module_emb.weight, std=0.5)
        K, R = c.K, c.rank
        for t in self.types:
            d_in = int(c.module_shapes[t][0])
            wa = self.head_a[_pkey(t)].view(R, K, d_in)
            bound = 1.0 / math.sqrt(d_in)
            if c.a_init_std is None:
                nn.init.uniform_(wa[:, K - 1, :], -bound, bound)
                nn.init.normal_(wa[:, : K - 1, :], std=bound / math.sqrt(c.latent_dim))
            else:
                nn.init.normal_(wa, std=float(c.a_init_std))
            nn.init.zeros_(self.head_b[_pkey(t)])

    @classmethod
    def for_model(cls, model: nn.Module, rank: int = 8, target_modules: Sequence[str] = ("q_proj", "v_proj"),
                  latent_dim: int = 32, **kw: Any) -> "HyperNetwork":
        """A fresh hypernetwork for `model`'s target modules (any transformers causal LM: nn.Linear or Conv1D).

        Extra keywords are HyperNetworkConfig fields (task_emb_dim, hidden_dim, lora_alpha, ...).
        """
        cfg = cls.config_for_model(model, rank=rank, target_modules=target_modules, latent_dim=latent_dim, **kw)
        return cls(cfg)

    @staticmethod
    def config_for_model(model: nn.Module, rank: int = 8, target_modules: Sequence[str] = ("q_proj", "v_proj"),
                         latent_dim: int = 32, **kw: Any) -> HyperNetworkConfig:
        """The HyperNetworkConfig that `for_model` would build (target shapes read from `model`)."""
        targets = find_targets(model, target_modules)
        groups = group_by_type(targets)
        wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        types = [g for t in dict.fromkeys(wanted) for g in groups if matches_type(groups[g][0], t)]
        types = list(dict.fromkeys(types))
        shapes = {t: list(targets[groups[t][0]]) for t in types}
        names = {t: list(groups[t]) for t in types}
        layer_idx = {t: [layer_index(n, i) for i, n in enumerate(groups[t])] for t in types}
        mcfg = getattr(model, "config", None)
        n_layers = max([max(v) + 1 for v in layer_idx.values()] + [int(getattr(mcfg, "num_hidden_layers", 0) or 0)])
        kw.setdefault("lora_alpha", 2.0 * rank)
        cfg = HyperNetworkConfig(rank=rank, latent_dim=latent_dim, target_modules=types, module_shapes=shapes,
                                 module_names=names, layer_indices=layer_idx, num_layers=n_layers,
                                 base_model_name_or_path=getattr(mcfg, "_name_or_path", None) or None,
                                 base_model_type=getattr(mcfg, "model_type", None), **kw)
        cfg.validate()
        return cfg

    # ---- forward -----------------------------------------------------------------------------

    def _check_task_emb(self, task_emb: torch.Tensor) -> torch.Tensor:
        if not isinstance(task_emb, torch.Tensor):
            raise TypeError(f"task_emb must be a torch.Tensor [P, {self.config.task_emb_dim}], got {type(task_emb).__name__}")
        if task_emb.dim() == 1:
            task_emb = task_emb.unsqueeze(0)
        if task_emb.dim() != 2 or task_emb.shape[1] != self.config.task_emb_dim:
            raise ValueError(f"task_emb must be [P, {self.config.task_emb_dim}] (the encoder's embedding size in "
                             f"config.task_emb_dim), got {tuple(task_emb.shape)}")
        if not task_emb.is_floating_point():
            raise TypeError(f"task_emb must be a float tensor, got {task_emb.dtype}")
        p = self.trunk_in.weight
        return task_emb.to(device=p.device, dtype=p.dtype)

    def latents(self, task_emb: torch.Tensor) -> dict[str, torch.Tensor]:
        """Module type -> z [P, L_type, K] (float, the trunk's dtype), K = latent_dim + 1, z[..., -1] == 1.

        The trunk's first Linear acts on the concatenation t ⊕ layer_emb ⊕ module_emb; it is evaluated as the
        sum of its three column blocks (the same function) so that P*L*M rows are never materialized.
        """
        e = self._check_task_emb(task_emb)
        t = self.task_proj(e)  # [P, t_dim]
        W = self.trunk_in.weight
        td, ld = self._t_dim, self.config.layer_emb_dim
        ht = t @ W[:, :td].T + self.trunk_in.bias  # [P, H]
        out: dict[str, torch.Tensor] = {}
        for mi, mtype in enumerate(self.types):
            idx = torch.as_tensor(self.config.layer_indices[mtype], device=W.device)
            hl = self.layer_emb(idx) @ W[:, td:td + ld].T  # [L, H]
            hm = self.module_emb.weight[mi] @ W[:, td + ld:].T  # [H]
            h = ht[:, None, :] + hl[None, :, :] + hm  # [P, L, H]
            z = self.trunk(h)  # [P, L, latent_dim]
            out[mtype] = torch.cat([z, torch.ones_like(z[..., :1])], dim=-1)
        return out

    def head(self, module_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_a [R*K, d_in], w_b [d_out, R*K]) of one module type; layout in the module docstring."""
        if module_type not in self.types:
            raise KeyError(f"module type {module_type!r} is not a target of this hypernetwork; targets: {self.types}")
        return self.head_a[_pkey(module_type)], self.head_b[_pkey(module_type)]

    def generate(self, task_emb: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module type -> (A [P, L, R, d_in], B [P, L, d_out, R]), differentiable, scale NOT applied."""
        R, K = self.config.rank, self.config.K
        out = {}
        for mtype, z in self.latents(task_emb).items():
            w_a, w_b = self.head(mtype)
            a = torch.einsum("plk,rki->plri", z, w_a.view(R, K, -1))
            b = torch.einsum("plk,ork->plor", z, w_b.view(-1, R, K))
            out[mtype] = (a, b)
        return out

    def forward(self, task_emb: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return self.generate(task_emb)

    def module_names(self, module_type: str) -> list[str]:
        """Full module paths in the base model for one module type, one per layer (L of them)."""
        if module_type not in self.config.module_names:
            raise KeyError(f"module type {module_type!r} is not a target of this hypernetwork; targets: {self.types}")
        return list(self.config.module_names[module_type])

    def targets(self) -> dict[str, tuple[int, int]]:
        """Full module name -> (d_in, d_out) for every module this hypernetwork writes (for AdapterPool)."""
        out = {}
        for t in self.types:
            d_in, d_out = (int(d) for d in self.config.module_shapes[t])
            for n in self.config.module_names[t]:
                out[n] = (d_in, d_out)
        return out

    def adapters(self, task_emb: torch.Tensor) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Per policy: full module name -> (A [R, d_in], B [d_out, R]) (scale NOT applied; for pool.write/PEFT)."""
        gen = self.generate(task_emb)
        P = next(iter(gen.values()))[0].shape[0]
        res: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(P)]
        for mtype, (a, b) in gen.items():
            for li, name in enumerate(self.config.module_names[mtype]):
                for p in range(P):
                    res[p][name] = (a[p, li], b[p, li])
        return res

    # ---- AdapterSource (hyperlora.hypernets.source) -----------------------------------------------

    needs_encoder = True  # adapters_for needs the policies' embeddings (the runtime's PolicyEncoder)
    supports_latent = True  # linear latent head: the latent path and the fused generate_lora pool write

    def adapters_for(self, texts: Sequence[str], task_emb: torch.Tensor | None = None
                     ) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """`AdapterSource.adapters_for`: per policy {module name: (A [R, d_in], B [d_out, R])}, scale NOT applied,
        from `task_emb` [P, E] (the embeddings of `texts`; required, this source does not read text)."""
        if task_emb is None:
            raise ValueError("HyperNetwork.adapters_for needs task_emb [P, E] (encode the texts first)")
        if int(task_emb.shape[0]) != len(texts):
            raise ValueError(f"adapters_for: {len(texts)} texts but {int(task_emb.shape[0])} task embeddings")
        return self.adapters(task_emb)

    # ---- identity, save, load ----------------------------------------------------------------

    def _version_key(self) -> tuple:
        return tuple((n, p.data_ptr(), p._version, p.dtype, p.device) for n, p in self.named_parameters())

    def check_policy(self, text: str) -> None:
        """`AdapterSource.check_policy`: nothing to check here; the runtime's policy encoder reads the text (MiniLM
        warns past its window, the base-model encoders refuse texts over ``limits.MAX_POLICY_TOKENS``)."""

    def weights_id(self) -> str:
        """A stable hash of (config, every weight's bytes): the hypernetwork's identity in pool content keys.

        Cached until a parameter changes in place (optimizer steps and load_state_dict bump tensor versions).
        """
        key = self._version_key()
        if self._id_cache is not None and self._id_cache[0] == key:
            return self._id_cache[1]
        h = hashlib.sha256()
        h.update(self.config.to_json().encode())
        for name, tensor in sorted(self.state_dict().items()):
            t = tensor.detach().to("cpu").contiguous()
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        digest = h.hexdigest()[:32]
        self._id_cache = (key, digest)
        return digest

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json and hypernet.safetensors (no pickle) into `directory`."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / CONFIG_NAME).write_text(self.config.to_json() + "\n")
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(d / WEIGHTS_NAME), metadata={"format": "pt", "hyperlora_format_version": str(FORMAT_VERSION)})

    @classmethod
    def from_pretrained(cls, directory: str | Path, model: nn.Module | None = None,
                        device: str | torch.device | None = None) -> "HyperNetwork":
        """Load from `directory`. With `model`, refuse (ValueError naming the mismatch) a hypernetwork built for
        a base model with other target modules, layer names or shapes."""
        from safetensors.torch import load_file

        d = Path(directory)
        cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path} is missing: not a hyperlora hypernetwork directory")
        if not w_path.is_file():
            pickled = [p.name for p in d.glob("*.bin")] + [p.name for p in d.glob("*.pt")]
            hint = f" (found {pickled}: pickled weights are refused, they can run arbitrary code)" if pickled else ""
            raise FileNotFoundError(f"{w_path} is missing{hint}")
        cfg = HyperNetworkConfig.from_dict(json.loads(cfg_path.read_text()))
        if model is not None:
            check_config_matches_model(cfg, model)
        hn = cls(cfg)
        state = load_file(str(w_path))
        expected = hn.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{w_path}: weights do not match config.json (missing {missing[:5]}, unexpected "
                             f"{unexpected[:5]})")
        for k, v in state.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise ValueError(f"{w_path}: weight {k!r} has shape {tuple(v.shape)}, config.json implies "
                                 f"{tuple(expected[k].shape)}")
        dtypes = {v.dtype for v in state.values()}
        if len(dtypes) == 1:
            hn = hn.to(dtype=dtypes.pop())
        hn.load_state_dict(state, strict=True)
        if device is not None:
            hn = hn.to(device)
        return hn


def check_config_matches_model(cfg: HyperNetworkConfig, model: nn.Module) -> None:
    """Raise ValueError naming every difference between a hypernetwork config and `model`'s target modules.

    A hypernetwork may cover a subset of a type's layers (e.g. trained for the upper layers only): its module
    names must exist in the model with its shapes, and its layer count must be the model's."""
    try:
        targets = find_targets(model, cfg.target_modules)
    except ValueError as exc:
        raise ValueError(f"hypernetwork does not match this base model: {exc}") from None
    groups = group_by_type(targets)
    problems = []
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if cfg.base_model_type and mtype and cfg.base_model_type != mtype:
        problems.append(f"model_type: hypernetwork built for {cfg.base_model_type!r}, model is {mtype!r}")
    for t in cfg.target_modules:
        if t not in groups:
            problems.append(f"module type {t!r}: the model's matching modules group as {sorted(groups)}")
            continue
        got_shape = list(targets[groups[t][0]])
        if got_shape != [int(d) for d in cfg.module_shapes[t]]:
            problems.append(f"{t} shape (d_in, d_out): hypernetwork {tuple(cfg.module_shapes[t])}, model {tuple(got_shape)}")
        absent = [n for n in cfg.module_names[t] if n not in set(groups[t])]
        if absent:
            problems.append(f"{t} modules: hypernetwork has {len(cfg.module_names[t])}, {len(absent)} of them not in "
                            f"the model (first {absent[0]!r}); model has {len(groups[t])} (first {groups[t][0]!r})")
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if isinstance(n_layers, int) and n_layers != cfg.num_layers:
        problems.append(f"num_layers: hypernetwork built for {cfg.num_layers} layers, model has {n_layers}")
    if problems:
        raise ValueError("hypernetwork config does not match the base model: " + "; ".join(problems))

