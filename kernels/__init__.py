"""Triton kernels, installed as `hyperlora.kernels` (a top-level `kernels` would collide with a PyPI package).

Each module holds one op's kernels and launchers; the public, validated entry points are in
`hyperlora.ops`. Under TRITON_INTERPRET=1 (set before import) they run on the CPU for tests.
"""
