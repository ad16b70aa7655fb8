"""`python -m semibench` is the `semibench` command."""
import sys

from .cli import main

sys.exit(main())
