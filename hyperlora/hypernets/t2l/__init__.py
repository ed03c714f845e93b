"""The T2L-style hypernetwork: a policy embedding (MiniLM or the base model) -> MLP -> one linear head per module."""
