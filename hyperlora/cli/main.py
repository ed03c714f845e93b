"""hyperlora: policy text -> LoRA adapters, many adapters served in one forward pass.

Each subcommand lives in its own module with add_arguments() and run() (see COMMANDS).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules import heavy dependencies inside run(), so --help is fast.
COMMANDS = {
    "info": ("hyperlora.cli.info", "versions, GPU and backend availability (add --json for scripts)"),
    "demo": ("hyperlora.cli.demo", "policies -> adapters -> one mixed batch on SmolLM2, beside the base model"),
    "train": ("hyperlora.cli.train", "train a hypernetwork (--method reader: the policy reader; sft: T2L-style) or a baseline LoRA (multitask_lora, oracle_lora)"),
    "eval": ("hyperlora.cli.eval", "held-out policy evaluation against the baselines"),
}


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
    return int(args._run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
