"""`python -m infinitystar.cli ...`: the same as the `infinitystar` command."""
import sys

from infinitystar.cli import main

sys.exit(main())
