"""The command line: `hyperlora info | demo | train | eval` (each a module with add_arguments and run)."""
