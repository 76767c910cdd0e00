"""benchmarks/gpu.py in its --dry-run mode (a tiny configuration on the CPU): the script runs end to end."""
import json

import pytest


@pytest.fixture(scope="module")
def gpu_bench(load_script):
    return load_script("benchmarks/gpu.py")


def test_dry_run_times_every_stage_beside_the_plan(gpu_bench, capsys):
    assert gpu_bench.main(["--dry-run", "--json", "--flex", "--peak-tflops", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["device"] == "cpu" and out["peak_tflops"] == 1.0
    (res,) = out["results"]
    stages = {s["stage"]: s for s in res["stages"]}
    assert list(stages) == ["load", "text", "transformer", "decode"]
    for name in ("text", "transformer", "decode"):
        s = stages[name]
        assert s["seconds"] > 0 and s["planned_flops"] > 0 and s["predicted_peak_bytes"] > 0
        assert s["mfu"] == pytest.approx(s["planned_flops"] / s["seconds"] / (1e12 * (0.5 if name == "decode" else 1)))
    assert res["predicted"]["flops"] == pytest.approx(sum(s["planned_flops"] for s in res["stages"]))
    flex = out["flex"]
    assert flex["visual_tokens"] > 0 and flex["flops"] > 0 and flex["seconds"] > 0
    assert set(flex["backends"]) == {"flex", "grouped", "sdpa"}
    # fp32 on the CPU: the three backends compute the same function
    assert flex["backends"]["flex"]["logits_max_abs_diff_vs_sdpa"] < 1e-4
    assert flex["backends"]["grouped"]["logits_max_abs_diff_vs_sdpa"] < 1e-4
    assert max(flex["attention_fp32_max_abs_diff_vs_sdpa"].values()) < 1e-5


def test_no_gpu_is_a_clear_error(gpu_bench):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_bench.main([])


def test_peak_breakdown_lists_what_is_alive_at_the_peak(gpu_bench):
    def frame(name, line):
        return {"filename": "/x/src/infinitystar/model/layers.py", "line": line, "name": name}
    other = {"filename": "/torch/nn/modules/module.py", "line": 1, "name": "_call_impl"}
    trace = [{"action": "alloc", "addr": 1, "size": 100, "frames": [other, frame("mlp", 10)]},
             {"action": "alloc", "addr": 2, "size": 50, "frames": [frame("attn", 20)]},
             {"action": "free_completed", "addr": 1, "size": 100},
             {"action": "alloc", "addr": 3, "size": 30, "frames": [frame("mlp", 10)]},    # total 80 < 150
             {"action": "alloc", "addr": 4, "size": 90, "frames": []},                     # total 170: the peak
             {"action": "free_completed", "addr": 4, "size": 90}]
    out = gpu_bench.peak_breakdown(trace)
    assert out["peak_bytes_in_trace"] == 170
    assert out["groups"] == [{"where": "(other)", "bytes": 90, "count": 1},
                             {"where": "layers.py:20 attn", "bytes": 50, "count": 1},
                             {"where": "layers.py:10 mlp", "bytes": 30, "count": 1}]
