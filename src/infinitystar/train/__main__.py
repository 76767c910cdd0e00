"""`python -m infinitystar.train CONFIG` / `torchrun --nproc_per_node N -m infinitystar.train CONFIG`."""
import sys

from infinitystar.train.cli import main

sys.exit(main())
