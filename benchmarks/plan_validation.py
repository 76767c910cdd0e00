"""Predicted (the `infinitystar plan` simulator) versus measured peak memory of small real runs on this CPU.

    python benchmarks/plan_validation.py            # all cases
    python benchmarks/plan_validation.py decode     # one case; --json for one JSON line per case

Each case runs for real in a fresh process (peak resident memory during the call above the level before it) and
on the meta device under the simulator; see `infinitystar.plan.validate` for how, docs/gpu.md for the results.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from infinitystar.plan.validate import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
