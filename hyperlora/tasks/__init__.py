"""Policy tasks: a seeded generator of enterprise policy tasks, the JSONL task format, and splits by policy."""
