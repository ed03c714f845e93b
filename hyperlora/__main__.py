"""`python -m hyperlora` is the `hyperlora` command."""
import sys

from hyperlora.cli import main

sys.exit(main())
