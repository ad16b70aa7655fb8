"""`python -m semibench` is the `semibench` command."""
import sys

from semibench.cli import main

sys.exit(main())
