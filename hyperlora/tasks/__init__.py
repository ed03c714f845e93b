"""Policy tasks: a seeded generator of enterprise policy tasks, the JSONL task format, and splits by policy.

    from hyperlora.tasks import generate_suite, load_tasks, save_tasks, tiny_suite
    suite = generate_suite(seed=0)          # {"train": [...], "held_out_combo": [...], ...}
    save_tasks(suite["held_out_topic"], "ho.jsonl"); tasks = load_tasks("ho.jsonl")

The prompt format shared by training, evaluation and the demo is in ``hyperlora.modeling.prompts``.
"""
from __future__ import annotations

from pathlib import Path

from .format import Example, PolicyTask, TaskFormatError, load_tasks, parse_task, save_tasks, task_to_dict
from .generator import FAMILIES, SPLITS, generate_suite, generate_tasks

__all__ = ["Example", "PolicyTask", "TaskFormatError", "load_tasks", "save_tasks", "parse_task", "task_to_dict",
           "FAMILIES", "SPLITS", "generate_suite", "generate_tasks", "tiny_suite", "TINY_PATH", "make_tiny_suite"]

TINY_PATH = Path(__file__).parent / "data" / "tiny.jsonl"


def make_tiny_suite() -> list[PolicyTask]:
    """How tiny.jsonl was made: a few tasks per family and split, 8 examples each (seed 1234)."""
    suite = generate_suite(1234, train_per_family=2, held_out_per_family=1, examples_per_task=8,
                           held_out_examples_per_task=8, n_paraphrases=2)
    return [t for split in SPLITS for t in suite[split]]


def tiny_suite() -> list[PolicyTask]:
    """The fixed tiny task set for tests (read from the committed tiny.jsonl, so it never drifts)."""
    return load_tasks(TINY_PATH)
