"""Triton kernels (`hyperlora.kernels`; never a top-level `kernels`: Hugging Face's `kernels` package, which
transformers >= 5.25 imports, would be shadowed by it or shadow it).

Each module holds one op's kernels and launchers; the public, validated entry points are in
`hyperlora.ops`. Under TRITON_INTERPRET=1 (set before import) they run on the CPU for tests.
"""
