"""Evaluation: option scoring, adapter sources for each condition, the held-out evaluation and its report."""
