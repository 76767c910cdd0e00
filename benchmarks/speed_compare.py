"""Before/after speed table: this checkout against an older one, interleaved on the same machine.

    git worktree add /tmp/before <older commit>
    python benchmarks/speed_compare.py --before /tmp/before [--rounds 3] [--cases train tokenizer model gen384]

Every measurement runs in a fresh process (its peak memory is its own), with this checkout's benchmark code
(src/infinitystar/bench.py, src/infinitystar/train/bench.py; --before-bench names another checkout whose copies
run the older tree when this checkout's no longer import there) and the package of the tree measured, so both rows of
a case time the same work. Rounds go before, after fp32, after auto, before, ... so load from other processes
falls on all rows alike; the table shows medians over rounds and the JSON lines of every run go to --out. On a
machine shared with other work, CPU time (the process's, all threads) moves less with the load than wall time;
both are shown, and `--threads N` sets the thread count of every run.

Cases: train (configs/default_model.yaml, micro-batch 8 of the synthetic mix; eager, and compiled as that config
trains), tokenizer (the training step of configs/default_tokenizer_continuous.yaml), model (the shipped default
model, a 17-frame video, CFG and decoding included), gen384 (transformer-only text-to-video at width 384, depth 6,
4 clips, random weights).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
CASES = {
    # case: (bench module, function, kwargs, the "after" rows (a precision, or a precision with extra arguments of
    # this checkout's bench), the wall-clock number reported, its CPU-time counterpart)
    "train": ("train/bench.py", "run_train_bench", {"steps": 3},
              (("fp32", {"compile": False}), ("auto", {"compile": False}), ("auto", {"compile": True})), "tokens_per_s",
              "tokens_per_cpu_s"),
    "tokenizer": ("train/bench.py", "run_tokenizer_bench", {"steps": 3}, ("fp32", "auto"), "step_s", "cpu_s"),
    "model": ("bench.py", "run_model", {"repeats": 2}, ("fp32", "auto"), "seconds_per_video", "cpu_s"),
    "gen384": ("bench.py", "run", {"clips": (4,), "width": 384, "depth": 6, "attention": ("sparse",),
                                   "repeats": 1}, ("fp32", "auto"), "seconds_per_video", "cpu_s"),
}
THREADS = 0
RUNNER = """
import json, os, sys, tempfile
# importable by name (a link to this checkout's file), so that spawned case processes find it too
d = tempfile.mkdtemp()
os.symlink(sys.argv[1], os.path.join(d, "bench_under_test.py"))
sys.path.insert(0, d)
import bench_under_test
getattr(bench_under_test, sys.argv[2])(**json.loads(sys.argv[3]), as_json=True)
"""


def row_spec(row) -> tuple[str, dict, str]:
    """(precision, extra bench arguments, row label) of an entry of a case's "after" rows."""
    precision, extra = (row, {}) if isinstance(row, str) else row
    return precision, extra, " ".join([precision, *(f"{k}={v}" for k, v in extra.items())])


def measure(tree: Path, case: str, precision: str, bench_tree: Path = HERE, extra: dict | None = None) -> dict:
    module, func, kwargs = CASES[case][:3]
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    if THREADS:
        env["OMP_NUM_THREADS"] = str(THREADS)
    args = json.dumps({**kwargs, **(extra or {}), "precision": precision})
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(bench_tree / "src" / "infinitystar" / module), func, args],
                          cwd=HERE, env=env, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"{case} {precision} in {tree} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(lines[-1]), "tree": str(tree), "case": case}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, type=Path, help="checkout of the older code")
    p.add_argument("--before-bench", type=Path, default=None,
                   help="checkout whose benchmark modules time the older code, when this checkout's no longer import "
                        "there (same work measured; default: this checkout)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per case (--rounds-for CASE N overrides)")
    p.add_argument("--rounds-for", nargs=2, action="append", default=[], metavar=("CASE", "N"))
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--out", type=Path, default=Path("speed_compare.jsonl"), help="every run's JSON line")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default: torch's own)")
    a = p.parse_args(argv)
    global THREADS
    THREADS = a.threads
    rows: dict[tuple[str, str], list[dict]] = {}
    with a.out.open("w") as log:
        for case in a.cases:
            runs = [("before fp32", a.before, "fp32", a.before_bench or HERE, {})] + [
                (f"after {name}", HERE, prec, HERE, extra) for prec, extra, name in map(row_spec, CASES[case][3])]
            for _ in range(dict((c, int(n)) for c, n in a.rounds_for).get(case, a.rounds)):
                for label, tree, prec, bench_tree, extra in runs:
                    r = measure(tree, case, prec, bench_tree, extra)
                    log.write(json.dumps(r) + "\n")
                    log.flush()
                    rows.setdefault((case, label), []).append(r)
                    print(f"{case:9} {label:24} -> {r['precision']}: {r[CASES[case][4]]} "
                          f"(cpu {r[CASES[case][5]]})", flush=True)
    print("\n| case | row | precision used | wall median | speed-up | CPU-time median | speed-up | useful FLOP "
          "fraction | matmul TFLOP/s | peak MB | runs |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for case in a.cases:
        wall, cpu = CASES[case][4:6]
        med = lambda rs, k: statistics.median(r[k] for r in rs)
        gain = lambda k, v, b: v / b if k.startswith("tokens") else b / v
        base = rows[(case, "before fp32")]
        for (c, label), rs in rows.items():
            if c != case:
                continue
            frac = [r.get("useful_fraction") for r in rs]
            frac = "" if None in frac else f"{statistics.median(frac):.3f}"
            rate = statistics.median(r.get("matmul_tflops", r.get("matmul_gflops", 0) / 1e3) for r in rs)
            peak = statistics.median(r.get("peak_memory_mb", r.get("peak_mb", 0)) for r in rs)
            print(f"| {case} | {label} | {rs[0]['precision']} | {med(rs, wall):.3f} {wall} | "
                  f"{gain(wall, med(rs, wall), med(base, wall)):.2f}x | {med(rs, cpu):.3f} {cpu} | "
                  f"{gain(cpu, med(rs, cpu), med(base, cpu)):.2f}x | {frac} | {rate:.3f} | {peak:.0f} | {len(rs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
