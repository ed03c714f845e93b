"""Serving: the LoRA layers that replace a model's Linear/Conv1D, `attach` and `Runtime` (pool slots per
policy, mixed-policy forward passes, decoding, PEFT import/export)."""
from hyperlora.runtime.runtime import Runtime, attach

__all__ = ["Runtime", "attach"]
