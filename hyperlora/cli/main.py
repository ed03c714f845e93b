"""hyperlora: policy text -> LoRA adapters, many adapters served in one forward pass.

Each subcommand lives in its own module with add_arguments() and run() (see COMMANDS).

Exit status: 0 on success, 2 for bad input. Bad input is any of INPUT_ERRORS raised by a command: a task
file that breaks the format (``TaskFormatError``, naming file:line), a missing or unreadable input file, a bad
flag, config or ``--set`` value or policy text (``UsageError``). It is reported once, here, as one line on
stderr (``hyperlora COMMAND: <problem>``) with no traceback. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from hyperlora.cli.errors import UsageError
from hyperlora.tasks.format import TaskFormatError

# name -> (module, one-line help). Modules import heavy dependencies inside run(), so --help is fast.
COMMANDS = {
    "info": ("hyperlora.cli.info", "versions, GPU and backend availability (add --json for scripts)"),
    "demo": ("hyperlora.cli.demo", "policies -> adapters -> one mixed batch on SmolLM2, beside the base model"),
    "train": ("hyperlora.cli.train", "train a hypernetwork (--method reader: the policy reader; sft: T2L-style) or a baseline LoRA (multitask_lora, oracle_lora)"),
    "eval": ("hyperlora.cli.eval", "held-out policy evaluation against the baselines"),
    "serve": ("hyperlora.cli.serve", "an OpenAI-compatible HTTP server: a policy per request, mixed-policy batching"),
}


INPUT_ERRORS: tuple[type[BaseException], ...] = (TaskFormatError, UsageError, FileNotFoundError, IsADirectoryError,
                                                 NotADirectoryError, PermissionError)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (line breaks become '; '), or its class name if it has none."""
    parts = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return "; ".join(parts) or type(exc).__name__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hyperlora", description=__doc__.splitlines()[0] if __doc__ else None,
                                     epilog="`hyperlora COMMAND --help` describes each command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            p.set_defaults(_missing=f"`hyperlora {name}` is unavailable: {exc}")
            continue
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    if getattr(args, "_missing", None):
        print(args._missing, file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except INPUT_ERRORS as exc:
        print(f"hyperlora {args.command}: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
