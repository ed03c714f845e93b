"""Base-model helpers shared by every layer above: loading the embedded model, the prompt format, decoding,
and the layer split used to cache lower-layer states."""
