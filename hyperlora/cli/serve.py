"""`hyperlora serve`: an OpenAI-compatible HTTP server, one policy per request, mixed-policy continuous batching.

    hyperlora serve                                   # the embedded SmolLM2 + the shipped hypernetwork, 127.0.0.1:8000
    hyperlora serve --adapter-dir ./adapters --api-key "$KEY" --port 8080

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="smollm2-135m-instruct", messages=[...],
                                   extra_body={"policy": "Answer 'flag' if ...; otherwise answer 'pass'."})

Loads the base model and hypernetwork (as `hyperlora demo` does), attaches the runtime, loads the PEFT adapters
found under each ``--adapter-dir``, and serves until SIGTERM / Ctrl-C, which stops admitting requests and drains
the ones in flight. What the server does and measures: docs/SERVING.md.
"""
from __future__ import annotations

import argparse
import os

from hyperlora.cli.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--model", help="base model directory or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--model-id", help="the name clients pass as `model` for the base model (default: the model "
                                      "directory's name, or smollm2-135m-instruct)")
    p.add_argument("--hypernet", help="hypernetwork directory (default: the shipped hyperlora/checkpoints/)")
    p.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                   help="a PEFT adapter directory, or a folder of them, served by name (repeatable)")
    p.add_argument("--api-key", default=os.environ.get("HYPERLORA_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 routes (default $HYPERLORA_API_KEY; none: open)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a batch row before a 429 (default 256)")
    p.add_argument("--max-batch", type=int, default=32, help="rows decoded together (default 32)")
    p.add_argument("--max-prefill-rows", type=int, default=8, help="requests prefilled per step (default 8)")
    p.add_argument("--max-prefill-tokens", type=int, default=2048,
                   help="prompt tokens prefilled per step (default 2048; a longer prompt at the head of the queue is "
                        "prefilled alone)")
    p.add_argument("--max-tokens", type=int, default=512,
                   help="most tokens one request may ask for, and the default when it asks for none (default 512)")
    p.add_argument("--max-policy-tokens", type=int, default=1024, help="longest policy text, in tokens (default 1024)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body; a larger one is a 400 (default 1 MiB)")
    p.add_argument("--max-adapters", type=int, default=None,
                   help="adapter pool slots (default max(64, 2 x --max-batch))")
    p.add_argument("--max-rank", type=int, default=None, help="pool rank (default: the hypernetwork's, at least 16)")
    p.add_argument("--max-adapters-per-step", type=int, default=None, metavar="N",
                   help="at most N distinct adapters among the running rows (rows without a policy not counted); a "
                        "request for another one waits, FIFO, until a running adapter's rows leave. 1: one policy at "
                        "a time, a single-adapter stack (make bench-serve's baseline). Default: no limit")
    p.add_argument("--calibration", metavar="FILE",
                   help="a decide() calibration JSON (hyperlora eval --escalate writes <name>_calibration.json) for "
                        "requests with options (default: raw option probabilities)")
    p.add_argument("--verifier", default="in_context", choices=["in_context", "judge", "none"],
                   help="decide()'s verifier for requests with options (default in_context; none: no verdict)")
    p.add_argument("--budget", type=float, default=0.1,
                   help="decide()'s review budget for requests with options: escalate trust below the --calibration "
                        "file's threshold for this budget (eval --escalate with the same BUDGET writes it; a file "
                        "without that threshold is refused at start); without --calibration nothing escalates, "
                        "with a warning at start (default 0.1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="log level of the server and uvicorn (default info)")


def run(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    import torch
    import uvicorn

    import hyperlora
    from hyperlora.hypernets.checkpoints import load
    from hyperlora.modeling.base_model import DEFAULT_MODEL_ID, load_base_model
    from hyperlora.serving.app import Server, ServerConfig, create_app
    from hyperlora.serving.engine import Engine
    from hyperlora.serving.metrics import Metrics
    from hyperlora.serving.registry import PolicyRegistry

    calibrator = None
    if args.calibration:
        from hyperlora.decisions.calibration import Calibrator

        calibrator = Calibrator.load(args.calibration)
        have = sorted((calibrator.thresholds.get("budget") or {}).keys())
        if f"{args.budget:g}" not in have:
            raise UsageError(f"--calibration {args.calibration} has no escalation threshold for --budget {args.budget:g} "
                             f"(it has: {', '.join(have) or 'none'}); refit with `hyperlora eval --escalate "
                             f"{args.budget:g}` or pass one of those budgets")
    for name in ("max_queue", "max_batch", "max_prefill_rows", "max_prefill_tokens", "max_tokens",
                 "max_policy_tokens", "max_body_bytes"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be >= {0 if name == 'max_queue' else 1}")
    if args.max_adapters_per_step is not None and args.max_adapters_per_step < 1:
        raise UsageError("--max-adapters-per-step must be >= 1")
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port {args.port} is not a port number")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if calibrator is None:
        logging.getLogger("hyperlora.serve").warning(
            "no --calibration: requests with options get raw option probabilities and never escalate "
            "(each request is ranked alone); fit one with `hyperlora eval --escalate %g`", args.budget)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_base_model(args.model)
    hypernet, encode = load(model, tok, args.hypernet)
    rank = int(hypernet.config.rank)
    max_rank = args.max_rank or max(16, rank)
    rt = hyperlora.attach(model, hypernet, encoder=encode, max_adapters=args.max_adapters or max(64, 2 * args.max_batch),
                          max_rank=max_rank)
    model_id = args.model_id or (Path(args.model).name if args.model else DEFAULT_MODEL_ID.rsplit("-q", 1)[0])
    registry = PolicyRegistry.with_adapters(
        rt, model_id, args.adapter_dir, max_policy_tokens=args.max_policy_tokens,
        count_tokens=lambda t: len(tok(t, add_special_tokens=False)["input_ids"]))
    engine = Engine(rt, max_batch=args.max_batch, max_queue=args.max_queue, max_prefill_rows=args.max_prefill_rows,
                    max_prefill_tokens=args.max_prefill_tokens, pad_token_id=int(tok.pad_token_id or 0),
                    metrics=Metrics(rt.stats), max_adapters_per_step=args.max_adapters_per_step)
    app = create_app(engine, tok, registry, ServerConfig(model_id=model_id, api_key=args.api_key or None,
                                                         max_tokens=args.max_tokens,
                                                         max_body_bytes=args.max_body_bytes,
                                                         calibrator=calibrator, budget=args.budget,
                                                         verifier=None if args.verifier == "none" else args.verifier))
    print(f"hyperlora serve: model {model_id!r}, {len(registry.adapters)} adapters, hypernetwork rank {rank}; "
          f"http://{args.host}:{args.port}/v1" + (" (API key required)" if args.api_key else ""), flush=True)
    Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False),
           engine).run()
    return 0
