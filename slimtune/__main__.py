"""``python -m slimtune``: the command line (:mod:`slimtune.cli`)."""
import sys

from .cli import main

sys.exit(main())
