"""`python -m hyperlora` is the `hyperlora` command."""
import sys

from hyperlora.cli.main import main

sys.exit(main())
