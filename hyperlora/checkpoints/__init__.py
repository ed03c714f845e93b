"""Hypernetwork checkpoints shipped with the package (safetensors + JSON config + eval report)."""
