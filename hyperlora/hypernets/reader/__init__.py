"""The policy reader: the base model reads the policy; its features become rank-1 adapter slots (docs/READER.md)."""
