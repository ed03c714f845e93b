"""The HTTP server and its scheduler: `protocol` (OpenAI-style bodies and errors), `kv` (the running batch's KV
cache), `engine` (continuous mixed-policy batching on one scheduler thread), `registry` (policy ids and
server-side adapters), `metrics` (Prometheus), `app` (FastAPI routes, uvicorn). Imports ops .. runtime only;
`hyperlora serve` (cli/serve.py) wires it together. See docs/SERVING.md."""
