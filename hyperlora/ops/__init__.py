"""Public, validated ops. Each dispatches to a torch reference, a Triton kernel or the CUDA extension.

- `add_lora`: many materialized LoRA adapters in one batch (SGMV-style), slot -1 = no adapter.
- `generate_lora`: hypernetwork head outputs written straight into adapter-pool slots.
- `latent_lora`: the fused path that applies generated adapters without materializing them.

The functions are imported eagerly (the modules need only torch; Triton and the CUDA extension load on
first use). Binding them here after the submodule imports means `from hyperlora.ops import add_lora`
is always the function, never the submodule of the same name.
"""
from hyperlora.ops.add_lora import add_lora
from hyperlora.ops.generate_lora import generate_lora
from hyperlora.ops.latent_lora import latent_lora
from hyperlora.ops.metadata import LoraBatchMeta, build_meta

__all__ = ["add_lora", "generate_lora", "latent_lora", "LoraBatchMeta", "build_meta"]
