"""Reading a base model's LoRA target modules: the one home of the module-name helpers.

Everything that picks, orders, groups or numbers target modules uses these functions, so the hypernetwork
(which writes adapters), the adapter pool and PEFT I/O (which store them) and the runtime (which serves
them) always agree on the same modules in the same order:

    natural_key("layers.10")        sort key: 'layers.9' before 'layers.10'
    module_type_of(name)            last name component ('model.layers.3.self_attn.q_proj' -> 'q_proj')
    matches_type(name, t)           name ends with the components of t ('q_proj', 'attn.c_proj')
    layer_index(name)               first integer component (the layer number), else a fallback
    linear_shape(module)            (d_in, d_out) of an nn.Linear / transformers Conv1D, else None
    find_targets(model, types)      full name -> (d_in, d_out) of the target modules, natural order
    group_by_type(targets)          module type -> full names, one (d_in, d_out) per type
    type_of_names(targets)          full name -> its module type under group_by_type
    module_name(model, layer, t)    full name of module type t in decoder layer `layer` (Llama-style)
"""
from __future__ import annotations

import re
from typing import Any, Sequence

from torch import nn

try:  # transformers is a dependency, but the helpers also work on plain torch models without it
    from transformers.pytorch_utils import Conv1D as _Conv1D
except ImportError:  # pragma: no cover
    _Conv1D = None  # type: ignore[assignment,misc]

__all__ = ["natural_key", "module_type_of", "matches_type", "layer_index", "linear_shape", "find_targets",
           "group_by_type", "type_of_names", "module_name", "is_conv1d"]


def natural_key(name: str) -> list[Any]:
    """Sort key that orders 'layers.10' after 'layers.9' (digit runs compare as integers)."""
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]


def module_type_of(name: str) -> str:
    """The module type of a full module path: its last component ('model.layers.3.self_attn.q_proj' -> 'q_proj')."""
    return name.rsplit(".", 1)[-1]


def matches_type(name: str, module_type: str) -> bool:
    """True if full module `name` ends with the components of `module_type` ('attn.c_proj', 'q_proj')."""
    return name == module_type or name.endswith("." + module_type)


def layer_index(name: str, fallback: int | None = None) -> int | None:
    """The first all-digit component of a module name (its layer number: 'model.layers.3.mlp.up_proj' -> 3),
    else `fallback`."""
    for tok in name.split("."):
        if tok.isdigit():
            return int(tok)
    return fallback


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2; weight [d_in, d_out]), a subclass of it, or a look-alike named Conv1D."""
    if _Conv1D is not None and isinstance(module, _Conv1D):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of a linear-like module (nn.Linear, or GPT-2's Conv1D whose weight is [d_in, d_out]); else None."""
    if isinstance(module, nn.Linear):
        return int(module.in_features), int(module.out_features)
    if is_conv1d(module) and getattr(module, "weight", None) is not None:
        w = module.weight
        if w.dim() == 2:
            return int(w.shape[0]), int(w.shape[1])
    return None


def find_targets(model: nn.Module, target_modules: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Full module name -> (d_in, d_out) for every linear-like module whose type is in `target_modules`.

    `target_modules` are module types matched against trailing name components (`matches_type`). The model's
    output embedding (`get_output_embeddings()`, the lm_head) is never a target. Names are naturally sorted
    (layer order). Raises ValueError if `target_modules` is empty, if a requested type matches nothing (naming
    it and the model's linear module types), and if a match is not linear or is the output embedding.
    """
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    wanted = list(dict.fromkeys(target_modules))
    if not wanted:
        raise ValueError("target_modules is empty: name at least one module type, e.g. ('q_proj', 'v_proj')")
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found: dict[str, tuple[int, int]] = {}
    linear_types: set[str] = set()
    for name, module in model.named_modules():
        if not name:
            continue
        is_out = out_emb is not None and module is out_emb
        shape = None if is_out else linear_shape(module)
        if shape is not None:
            linear_types.add(module_type_of(name))
        if any(matches_type(name, t) for t in wanted):
            if is_out:
                raise ValueError(f"target module {name!r} is the model's output embedding: LoRA targets are the "
                                 f"Linear/Conv1D layers of its blocks; leave it out of target_modules")
            if shape is None:
                raise ValueError(f"target module {name!r} is a {type(module).__name__}, not an nn.Linear or a "
                                 f"transformers Conv1D: LoRA targets must be linear layers")
            found[name] = shape
    missing = [t for t in wanted if not any(matches_type(n, t) for n in found)]
    if missing:
        raise ValueError(f"target_modules {missing} match no module of this model; its Linear/Conv1D module types "
                         f"are {sorted(linear_types)}")
    return {n: found[n] for n in sorted(found, key=natural_key)}


def group_by_type(targets: dict[str, tuple[int, int]]) -> dict[str, list[str]]:
    """Module type -> its full names in natural (layer) order; every type has one (d_in, d_out).

    The type is a module's last name component ('q_proj'). Where one short name has several shapes (GPT-2's
    attn.c_proj 768->768 and mlp.c_proj 3072->768), those modules are told apart by more trailing
    components ('attn.c_proj', 'mlp.c_proj'). Raises ValueError if even full names cannot separate them.
    """
    def split(names: list[str], depth: int) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for n in names:
            groups.setdefault(".".join(n.split(".")[-depth:]), []).append(n)
        out: dict[str, list[str]] = {}
        for key, members in groups.items():
            shapes = {tuple(targets[n]) for n in members}
            if len(shapes) == 1:
                out[key] = members
            elif depth >= max(len(n.split(".")) for n in members):
                raise ValueError(f"modules {members[:3]} have several shapes {sorted(shapes)}; a pool buffer and a "
                                 f"hypernetwork head need one (d_in, d_out) per module type")
            else:
                out.update(split(members, depth + 1))
        return out

    return split(sorted(targets, key=natural_key), 1)


def type_of_names(targets: dict[str, tuple[int, int]]) -> dict[str, str]:
    """Full module name -> its module type under `group_by_type` (the key of `pool.buffers` / `hn.head`)."""
    return {n: t for t, names in group_by_type(targets).items() for n in names}


def module_name(model: nn.Module, layer: int, mtype: str) -> str:
    """Full name of module type `mtype` (e.g. 'o_proj') in decoder layer `layer` of a Llama-style model."""
    prefix = f"model.layers.{layer}."
    for name, _ in model.named_modules():
        if name.startswith(prefix) and name.rsplit(".", 1)[-1] == mtype:
            return name
    raise ValueError(f"decoder layer {layer} of this model has no module {mtype!r} (the reader needs a "
                     f"Llama-style decoder with self_attn.o_proj and mlp.down_proj)")
