"""Write the reply-prefix compiler's background records into a reader directory (``reply_background.json``).

The compiler (``hyperlora.hypernets.reader.rules.reply_format.PrefixCompiler``) builds its statistics from the
base model's replies to a few user messages. Those messages are drawn once here, from the built-in task
generator (offline, deterministic), and shipped with the reader as data, so serving never imports the
generator. The shipped reader's file was written by

    python -c "from hyperlora.training.reply_background import write_background_records as w; \\
               w('hyperlora/checkpoints/smollm2-policy-reader-l29')"

and ``train_rule_heads`` writes it beside the heads it trains.
"""
from __future__ import annotations

from pathlib import Path

from hyperlora.hypernets.reader.rules.reply_format import BACKGROUND_SEED, N_BACKGROUND, N_KEYS, save_background_records
from hyperlora.tasks.generator import generate_tasks

__all__ = ["FAMILIES", "builtin_records", "write_background_records"]

FAMILIES = ("topic", "routing", "conjunction", "threshold")


def builtin_records(n: int, seed: int) -> list[str]:
    """`n` records of every choice family from the built-in generator (offline, deterministic): n // 4 per
    family (at least one), the first record of each training task of that family."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    per = max(1, n // 4)
    recs: list[str] = []
    for fam in FAMILIES:
        tasks = generate_tasks(fam, "train", per, seed=seed, examples_per_task=2, strict=False)
        recs += [t.examples[0].input for t in tasks][:per]
    return recs[:n]


def write_background_records(directory: str | Path, n: int = N_BACKGROUND + N_KEYS,
                             seed: int = BACKGROUND_SEED) -> Path:
    """Draw the compiler's `n` background records for `seed` and write them into `directory`; returns the file."""
    return save_background_records(directory, builtin_records(n, seed), seed=seed,
                                   source=f"hyperlora.training.reply_background.builtin_records({n}, {seed}): the "
                                          f"first record of {max(1, n // 4)} training tasks per family {list(FAMILIES)}")
