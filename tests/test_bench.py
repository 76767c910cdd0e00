"""`infinitystar bench --train / --tokenizer`: one JSON line that says what ran (precision used, measured matmul
rate, useful-FLOP fraction, peak memory); bad precision values are one-line errors."""
import json

import pytest

from infinitystar.cli import main
from infinitystar.model.attention import dense_mask
from infinitystar.train.bench import REPO, packed_forward_flops, synthetic_batch
from infinitystar.train.config import load_config


def test_train_bench_json_line_says_what_ran(capsys):
    assert main(["bench", "--train", "--config", str(REPO / "configs" / "tiny_generator.yaml"), "--precision",
                 "fp32", "--steps", "1", "--micro-batch", "2", "--json"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert r["precision"] == "fp32" and r["micro_batch"] == 2
    assert r["tokens_per_s"] > 0 and r["matmul_tflops"] > 0 and r["peak_memory_mb"] > 0
    assert 0 < r["useful_fraction"] == pytest.approx(r["useful_tflops"] / r["matmul_tflops"], rel=0.05, abs=1e-4)


def test_synthetic_mix_is_seeded_and_mostly_masked():
    run = load_config(REPO / "configs" / "default_model.yaml")
    cfg = run.model.build()
    a, b = (synthetic_batch(run, cfg, 8, seed=5, device="cpu") for _ in range(2))
    assert a.packed.segment_lengths == b.packed.segment_lengths and a.tokens == b.tokens
    kinds = {st.scale.clip for _, st in a.packed.visual_segments}
    assert len(kinds) > 1                                   # images and videos in one pack
    # most (query, key) pairs of the packed length are masked: the work grouped attention skips
    allowed = dense_mask(a.packed.document_id, a.packed.segment_table).sum().item()
    assert allowed < 0.25 * a.packed.length ** 2
    assert packed_forward_flops(cfg, a.packed) > 0


def test_bad_precision_is_rejected(capsys):
    assert main(["bench", "--train", "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'fp16'" in err and err.count("\n") == 1
