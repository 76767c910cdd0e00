"""torch.compile of the transformer blocks (`train.compile`, `InfinityStarTransformer.set_compile`): the same
numbers as eager execution, a bounded number of compilations, and a clean eager fallback with one warning where
inductor cannot compile."""
from __future__ import annotations

import warnings

import pytest
import torch

from infinitystar import runtime
from infinitystar.model.rope import Rope4D, apply_rope
from infinitystar.runtime import Compiler

from test_train import losses, run_training, tiny_config, write_dataset


def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def test_no_cpp_compiler_runs_eagerly_with_one_warning(monkeypatch):
    monkeypatch.setattr(runtime, "cpp_compiler", lambda: None)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("torch.compile called without a compiler"))
    group = Compiler("the test functions")
    f, g = group.wrap(_double), group.wrap(torch.neg)
    x = torch.arange(3.0)
    with pytest.warns(UserWarning, match="torch.compile of the test functions is off: no C\\+\\+ compiler found"):
        assert torch.equal(f(x), x * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # one warning for the whole group
        assert torch.equal(g(x), -x) and torch.equal(f(x), x * 2)


def test_failed_compilation_falls_back_but_a_real_error_propagates(monkeypatch):
    def broken(fn, **kw):
        def run(*args):
            raise RuntimeError("backend exploded\nlong inductor trace")
        return run
    monkeypatch.setattr(runtime, "cpp_compiler", lambda: "/usr/bin/g++")
    monkeypatch.setattr(torch, "compile", broken)
    group = Compiler("the test functions")
    bad_input = group.wrap(torch.matmul)
    with pytest.raises(RuntimeError, match="cannot be multiplied"), warnings.catch_warnings():
        warnings.simplefilter("error")          # the caller's own error: raised as is, no compile warning
        bad_input(torch.ones(2, 3), torch.ones(2, 3))
    with pytest.warns(UserWarning, match="compiling failed \\(RuntimeError: backend exploded\\); running eagerly"):
        assert torch.equal(bad_input(torch.eye(2), torch.ones(2, 2)), torch.ones(2, 2))
    assert group.failed


def test_cpp_compiler_is_found_on_the_path(monkeypatch, tmp_path):
    cxx = tmp_path / "my-cxx"
    cxx.write_text("#!/bin/sh\n")
    cxx.chmod(0o755)
    from torch._inductor import config as inductor_config
    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "my-cxx"))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert runtime.cpp_compiler() == str(cxx)
    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "no-such-cxx"))
    assert runtime.cpp_compiler() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_real_form_under_compile_equals_the_complex_product(monkeypatch, dtype):
    rope = Rope4D(16)
    cos, sin = rope.cos_sin(torch.randint(0, 40, (7, 4)))
    x = torch.randn(2, 7, 3, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    complex_form = apply_rope(x, cos.unsqueeze(-2), sin.unsqueeze(-2))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    real_form = apply_rope(x, cos.unsqueeze(-2), sin.unsqueeze(-2))
    assert real_form.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(real_form.float(), complex_form.float(), rtol=tol, atol=tol)


@pytest.mark.slow
@pytest.mark.skipif(runtime.cpp_compiler() is None, reason="inductor needs a C++ compiler")
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-4), ("bf16", 2e-2)])
def test_compiled_training_matches_eager(tmp_path, precision, tol):
    """Three tiny-model optimizer steps with train.compile on and off: the same losses to rounding (fp32) or to
    bf16 noise; and the blocks compile twice at most (their two halves; the packed lengths here share one
    power-of-two range, which is what a recompilation needs)."""
    from torch._dynamo.utils import counters
    data = write_dataset(tmp_path / "data")
    runs = {}
    for compile_ in (False, True):
        out = tmp_path / f"compile_{compile_}"
        raw = tiny_config(out, data, train={"max_steps": 3, "precision": precision, "compile": compile_},
                          checkpoint={"every": 0})
        before = counters["stats"]["unique_graphs"]
        run_training(raw)
        runs[compile_] = losses(out)
        graphs = counters["stats"]["unique_graphs"] - before
    assert 1 <= graphs <= 2
    assert len(runs[True]) == 3
    for a, b in zip(runs[False], runs[True]):
        assert a == pytest.approx(b, rel=tol)


@pytest.mark.slow
@pytest.mark.skipif(runtime.cpp_compiler() is None, reason="inductor needs a C++ compiler")
def test_compiled_tokenizer_steps_match_eager(tmp_path):
    """`train.compile` of both tokenizer trainers (video: continuous and bitwise; the 2-D Infinity VAE): the same
    fp32 losses as eager steps, and the model passes did go through torch.compile. Inductor's kernels round
    differently (encoder outputs ~4e-6 apart), and a latent that close to a quantizer threshold can take the other
    sign, hence 1e-3 on the quantized losses."""
    from torch._dynamo.utils import counters
    from infinitystar.train.infinity_tokenizer import InfinityTokenizerTrainer
    from infinitystar.train.infinity_tokenizer import config_from_dict as image_config
    from infinitystar.train.tokenizer import TokenizerTrainer, config_from_dict as video_config
    common = {"device": "cpu", "quant": {"calibration_clips": 2}, "checkpoint": {"every": 0},
              "log": {"every": 1, "progress": False}}
    video = {**common, "model": {"block_out_channels": [4, 8, 8, 8]}, "data": {"frames": 5, "val_samples": 1}}
    cases = [(TokenizerTrainer, video_config, {**video, "mode": "continuous"}),
             (TokenizerTrainer, video_config, {**video, "mode": "bitwise"}),
             (InfinityTokenizerTrainer, image_config, {**common, "data": {"val_samples": 1}})]
    for i, (trainer, make_config, raw) in enumerate(cases):
        losses = {}
        for compile_ in (False, True):
            torch._dynamo.reset()        # count this run's graphs (an equal earlier graph would be reused)
            before = counters["stats"]["unique_graphs"]
            cfg = make_config({**raw, "output_dir": str(tmp_path / f"{i}_{compile_}"), "train": {
                "max_steps": 2, "batch_size": 2, "val_every": 0, "precision": "fp32", "compile": compile_}})
            run = trainer(cfg)
            losses[compile_] = [run.train_step()["loss"] for _ in range(2)]
            run.close()
            graphs = counters["stats"]["unique_graphs"] - before
            assert graphs >= 2 if compile_ else graphs == 0     # an encoder and a decoder graph (at least)
        rel = 1e-4 if raw.get("mode") == "continuous" else 1e-3
        assert losses[True] == pytest.approx(losses[False], rel=rel), raw.get("mode", "image")
