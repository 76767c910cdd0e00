"""scripts/compare_evals.py: paired differences of two models' `eval shapes` samples and the release verdict."""
import json
import math

import pytest


@pytest.fixture(scope="module")
def cmp(load_script):
    return load_script("scripts/compare_evals.py")


def write_eval(folder, task, hits, splits=None, prompts=None):
    """hits[r][j]: sample j of round r all-correct (rounds repeat the same prompts, as --samples-per-prompt does)."""
    folder.mkdir(parents=True)
    n = len(hits[0])
    prompts = prompts or [f"prompt {j}" for j in range(n)]
    splits = splits or ["seen"] * n
    rows = [{"task": task, "split": splits[j], "prompts": [prompts[j]], "all_correct": bool(h), "round": r}
            for r, round_hits in enumerate(hits) for j, h in enumerate(round_hits)]
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_paired_difference_and_its_standard_error(tmp_path, cmp):
    # two rounds of four prompts: per-prompt shares base (1, .5, 0, 1), candidate (1, 1, .5, 1)
    write_eval(tmp_path / "a" / "t2i3", "t2i", [[1, 1, 0, 1], [1, 0, 0, 1]], splits=["seen", "seen", "heldout", "seen"])
    write_eval(tmp_path / "b" / "t2i3", "t2i", [[1, 1, 1, 1], [1, 1, 0, 1]], splits=["seen", "seen", "heldout", "seen"])
    r = cmp.compare(tmp_path / "a", tmp_path / "b", required=("t2i",))
    t = r["tasks"]["t2i"]
    diffs = [0, 0.5, 0.5, 0]
    assert t["n"] == 4 and t["base"] == pytest.approx(0.625) and t["candidate"] == pytest.approx(0.875)
    assert t["difference"] == pytest.approx(0.25)
    assert t["se"] == pytest.approx(math.sqrt(sum((d - 0.25) ** 2 for d in diffs) / 3 / 4))
    assert t["heldout"] == {"n": 1, "base": 0.0, "candidate": 0.5}
    assert r["passes"] is True and r["missing"] == []


def test_pools_folders_of_one_task_and_needs_every_task(tmp_path, cmp):
    for model, hits in (("a", [[1, 0]]), ("b", [[1, 1]])):
        write_eval(tmp_path / model / "t2i3", "t2i", hits)
        write_eval(tmp_path / model / "t2i4", "t2i", hits, prompts=["x", "y"])
        write_eval(tmp_path / model / "t2v3", "t2v", [[0, 1]])
    r = cmp.compare(tmp_path / "a", tmp_path / "b")
    assert r["tasks"]["t2i"]["n"] == 4 and r["tasks"]["t2v"]["difference"] == 0
    assert r["missing"] == ["i2v", "continuation", "long"] and r["passes"] is None
    assert "verdict: none, i2v, continuation, long not evaluated" in cmp.report(r, 2.0)


def test_a_task_far_below_the_base_keeps_the_base(tmp_path, cmp):
    n = 50
    write_eval(tmp_path / "a" / "t2i3", "t2i", [[1] * n])
    write_eval(tmp_path / "a" / "t2v3", "t2v", [[1] * n])
    write_eval(tmp_path / "b" / "t2i3", "t2i", [[1] * n])
    write_eval(tmp_path / "b" / "t2v3", "t2v", [[1] * 40 + [0] * 10])   # 20 points lower, SE ~5.7 points
    r = cmp.compare(tmp_path / "a", tmp_path / "b", required=("t2i", "t2v"))
    assert r["worse_by_more_than_sd"] == ["t2v"] and r["passes"] is False
    # a mean gain within its own noise does not ship either: t2i +2 prompts of 50, t2v -1
    write_eval(tmp_path / "c" / "t2i3", "t2i", [[0, 0] + [1] * (n - 2)])
    write_eval(tmp_path / "c" / "t2v3", "t2v", [[1] * n])
    write_eval(tmp_path / "d" / "t2i3", "t2i", [[1] * n])
    write_eval(tmp_path / "d" / "t2v3", "t2v", [[0] + [1] * (n - 1)])
    r = cmp.compare(tmp_path / "c", tmp_path / "d", required=("t2i", "t2v"))
    assert r["mean_difference"] == pytest.approx(0.01) and r["mean_se"] == pytest.approx(0.0172, abs=1e-4)
    assert r["worse_by_more_than_sd"] == [] and r["passes"] is False


def test_different_prompts_or_folders_are_errors(tmp_path, cmp, capsys):
    write_eval(tmp_path / "a" / "t2i3", "t2i", [[1, 0]])
    write_eval(tmp_path / "b" / "t2i3", "t2i", [[1, 0]], prompts=["other", "prompt 1"])
    with pytest.raises(cmp.CompareError, match="t2i3: the t2i prompts differ"):
        cmp.compare(tmp_path / "a", tmp_path / "b")
    write_eval(tmp_path / "c" / "t2i4", "t2i", [[1, 0]])
    assert cmp.main([str(tmp_path / "a"), str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.startswith("error: the folders differ")
    assert cmp.main([str(tmp_path / "a"), str(tmp_path / "nothing")]) == 2
    assert "no samples.jsonl" in capsys.readouterr().err
