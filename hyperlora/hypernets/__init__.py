"""Policy text -> adapter: the T2L-style hypernetwork (`t2l/`), the policy reader (`reader/`, with its rule
compilers in `reader/rules/`), and checkpoint finding/loading (`checkpoints.py`)."""
