"""Rule compilers of the policy reader: reply-format rules (prefixes, sign-offs) and numeric thresholds."""
