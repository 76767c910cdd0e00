"""`python -m infinitystar.train CONFIG` / `torchrun --nproc_per_node N -m infinitystar.train CONFIG`."""
import sys

from infinitystar.cli.train import main

sys.exit(main())
