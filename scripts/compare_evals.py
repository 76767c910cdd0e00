"""Is a candidate model better than the base? The release rule of the built-in model (docs/default_model.md,
"Reproducing and extending"), on `infinitystar eval shapes` output folders of the two models made with the same prompts.

    python scripts/compare_evals.py BASE CANDIDATE [--sd 2]

BASE and CANDIDATE are each an eval folder (holding samples.jsonl) or a folder of eval folders; sub-folders are
matched by name (e.g. t2i3, t2i4, t2v3), and the prompts of matched folders must be the same (same --n and --seed).
Every task's samples are paired by prompt: a prompt's score is the share of its samples (--samples-per-prompt)
that are all-correct, the task's difference is the mean over prompts of candidate minus base, and its standard
error is that of the paired differences. Folders of one task (t2i on prompt seeds 3 and 4) pool their prompts.

The candidate passes when the mean of the task differences is above one standard error of that mean (so a change
within the noise does not ship) and no task is lower by more than --sd standard errors of its own difference. The
verdict needs all five tasks (--tasks to judge others). One line per task and the verdict are printed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

SAMPLES = "samples.jsonl"
TASKS = ("t2i", "t2v", "i2v", "continuation", "long")


class CompareError(ValueError):
    pass


def eval_folders(root: Path) -> dict[str, Path]:
    """name -> samples file: the root itself ("."), or each of its sub-folders holding one."""
    if (root / SAMPLES).is_file():
        return {".": root / SAMPLES}
    found = {p.parent.name: p for p in sorted(root.glob(f"*/{SAMPLES}"))}
    if not found:
        raise CompareError(f"{root}: no {SAMPLES} in it or its sub-folders (give `infinitystar eval shapes` "
                           f"output folders)")
    return found


def prompt_scores(path: Path) -> dict[str, list[tuple[tuple[str, ...], str, float]]]:
    """task -> one (prompts, split, share of all-correct samples) per prompt, in the evaluation's order. Rounds of
    --samples-per-prompt repeat the same prompts in the same order."""
    rows = defaultdict(list)
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[row["task"]].append(row)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CompareError(f"{path}, line {i + 1}: not a sample of `eval shapes` ({e})") from None
    out = {}
    for task, task_rows in rows.items():
        per_round = defaultdict(list)
        for r in task_rows:
            per_round[r.get("round", 0)].append(r)
        first = per_round[min(per_round)]
        hits = [0] * len(first)
        for rnd in per_round.values():
            if [r["prompts"] for r in rnd] != [r["prompts"] for r in first]:
                raise CompareError(f"{path}: the rounds of task {task} do not repeat the same prompts")
            for j, r in enumerate(rnd):
                hits[j] += bool(r["all_correct"])
        out[task] = [(tuple(r["prompts"]), r["split"], h / len(per_round)) for r, h in zip(first, hits)]
    return out


def paired_scores(base: Path, cand: Path) -> dict[str, list[tuple[str, float, float]]]:
    """task -> (split, base score, candidate score) per prompt, pooled over the matched folders."""
    b_folders, c_folders = eval_folders(base), eval_folders(cand)
    if set(b_folders) != set(c_folders):
        raise CompareError(f"the folders differ: {base} has {sorted(b_folders)}, {cand} has {sorted(c_folders)}")
    pooled = defaultdict(list)
    for name in b_folders:
        b, c = prompt_scores(b_folders[name]), prompt_scores(c_folders[name])
        if set(b) != set(c):
            raise CompareError(f"{name}: the tasks differ ({sorted(b)} against {sorted(c)})")
        for task in b:
            if [p for p, _, _ in b[task]] != [p for p, _, _ in c[task]]:
                raise CompareError(f"{name}: the {task} prompts differ; evaluate both models with the same "
                                   f"--n and --seed")
            pooled[task] += [(split, sb, sc) for (_, split, sb), (_, _, sc) in zip(b[task], c[task])]
    return dict(pooled)


def mean_and_se(diffs: list[float]) -> tuple[float, float]:
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def compare(base: Path, cand: Path, sd: float = 2.0, required: tuple[str, ...] = TASKS) -> dict:
    tasks = {}
    for task, rows in sorted(paired_scores(base, cand).items()):
        diff, se = mean_and_se([c - b for _, b, c in rows])
        entry = {"n": len(rows), "base": sum(b for _, b, _ in rows) / len(rows),
                 "candidate": sum(c for _, _, c in rows) / len(rows), "difference": diff, "se": se}
        for split in ("seen", "heldout"):
            part = [(b, c) for s, b, c in rows if s == split]
            if part:
                entry[split] = {"n": len(part), "base": sum(b for b, _ in part) / len(part),
                                "candidate": sum(c for _, c in part) / len(part)}
        tasks[task] = entry
    mean_diff = sum(t["difference"] for t in tasks.values()) / len(tasks)
    mean_se = math.sqrt(sum(t["se"] ** 2 for t in tasks.values())) / len(tasks)
    worse = [k for k, t in tasks.items() if t["difference"] < -sd * t["se"]]
    missing = [k for k in required if k not in tasks]
    return {"tasks": tasks, "mean_difference": mean_diff, "mean_se": mean_se, "worse_by_more_than_sd": worse,
            "missing": missing, "passes": None if missing else bool(mean_diff > mean_se and not worse)}


def report(result: dict, sd: float) -> str:
    lines = ["task            n   base  cand   diff    se  (seen base/cand, held-out base/cand)"]
    for task, t in result["tasks"].items():
        split = ", ".join(f"{t[s]['base']:.1%}/{t[s]['candidate']:.1%}" for s in ("seen", "heldout") if s in t)
        lines.append(f"{task:<12} {t['n']:>4} {t['base']:6.1%} {t['candidate']:5.1%} {t['difference']:+6.1%} "
                     f"{t['se']:5.1%}  ({split})")
    worse = result["worse_by_more_than_sd"]
    lines.append(f"mean difference over tasks: {result['mean_difference']:+.1%} (SE {result['mean_se']:.1%}); lower "
                 f"by more than {sd:g} SE: {', '.join(worse) if worse else 'none'}")
    if result["missing"]:
        lines.append(f"verdict: none, {', '.join(result['missing'])} not evaluated")
    else:
        lines.append("verdict: the candidate passes" if result["passes"] else "verdict: keep the base")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", type=Path)
    p.add_argument("candidate", type=Path)
    p.add_argument("--sd", type=float, default=2.0, help="how many standard errors a task may fall (default 2)")
    p.add_argument("--tasks", default=",".join(TASKS), help="the tasks a verdict needs (default: all five)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON instead of the table")
    args = p.parse_args(argv)
    try:
        result = compare(args.base, args.candidate, args.sd, tuple(t for t in args.tasks.split(",") if t))
    except (CompareError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if args.json else report(result, args.sd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
