"""The shared training harness: precision (resolved once, recorded, fp32 where it must be), resume edge cases, and the
tokenizer's held-aside validation clips."""
import json
import warnings

import numpy as np
import pytest
import torch

from infinitystar.checkpoint_io import read_tensors
from infinitystar.quant.residual import encode_targets, quantize_multiscale
from infinitystar.runtime import precision_name, resolve_precision
from infinitystar.schedules.pyramid import Schedule
from infinitystar.train.config import ConfigError
from infinitystar.train.harness import adamw, param_groups
from infinitystar.train.infinity_targets import forward_loss
from infinitystar.train.tokenizer import TokenizerTrainer, config_from_dict
from infinitystar.train.tokenizer_data import ManifestSource, held_aside
from infinitystar.model.infinity import InfinityConfig, InfinityTransformer
from infinitystar.runtime import autocast


def _tokenizer_cfg(tmp_path, name, **train):
    return config_from_dict({
        "output_dir": str(tmp_path / name), "seed": 1, "device": "cpu", "mode": "bitwise",
        "model": {"block_out_channels": [4, 8, 8, 8]}, "data": {"frames": 5, "val_samples": 1},
        "quant": {"calibration_clips": 1}, "train": {"max_steps": 2, "batch_size": 1, "val_every": 0, **train},
        "checkpoint": {"every": 1}, "log": {"every": 1, "progress": False}})


def _log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "auto"])
def test_the_precision_used_is_resolved_once_and_recorded(tmp_path, precision):
    cfg = _tokenizer_cfg(tmp_path, precision, precision=precision)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # bf16 forced on a CPU without native support warns, and still runs
        want = precision_name(resolve_precision(precision, torch.device("cpu")))
        trainer = TokenizerTrainer(cfg)
    assert trainer.precision == want and trainer.dtype == (torch.bfloat16 if want == "bf16" else torch.float32)
    res = trainer.fit()
    lines = _log(tmp_path / precision / "metrics.jsonl")
    assert res.precision == want and res.summary()["precision"] == want
    assert [r["precision"] for r in lines if "loss" in r] == [want, want]
    assert all(np.isfinite(r["loss"]) for r in lines if "loss" in r)
    record = json.loads((res.model_dir / "tokenizer_training.json").read_text())
    assert record["precision"] == want
    # the model's weights stay fp32 whatever the forward computed in
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_resuming_a_bf16_run_is_exact(tmp_path):
    full = TokenizerTrainer(_tokenizer_cfg(tmp_path, "full", precision="bf16", max_steps=3)).fit()
    TokenizerTrainer(_tokenizer_cfg(tmp_path, "split", precision="bf16", max_steps=3)).fit(until=1)
    resumed = TokenizerTrainer(_tokenizer_cfg(tmp_path, "split", precision="bf16", max_steps=3), resume="latest").fit()
    a, b = (read_tensors(r.checkpoint / "model.safetensors") for r in (full, resumed))
    assert resumed.step == 3 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda recs: [{k: v for k, v in r.items() if k not in ("s_per_step", "peak_memory_mb")} for r in recs]
    assert strip(_log(tmp_path / "full" / "metrics.jsonl")) == strip(_log(tmp_path / "split" / "metrics.jsonl"))


def test_adamw_is_fused_on_plain_parameters_and_updates_as_the_loop():
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    start = nets[0][0].weight.detach().clone()
    fused = adamw(param_groups(nets[0], 0.1), lr=1e-2, betas=(0.9, 0.97))
    loop = torch.optim.AdamW(param_groups(nets[1], 0.1), lr=1e-2, betas=(0.9, 0.97), foreach=False)
    assert all(g["fused"] for g in fused.param_groups)
    for step in range(5):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        for net, opt in zip(nets, (fused, loop)):
            net(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    assert not torch.allclose(nets[0][0].weight, start, atol=1e-2)          # five steps of lr 1e-2 moved it
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(nets[0].parameters(), nets[1].parameters()))


def test_resume_without_a_checkpoint_starts_fresh_and_a_used_folder_needs_resume(tmp_path, capsys):
    res = TokenizerTrainer(_tokenizer_cfg(tmp_path, "run", precision="fp32"), resume="latest").fit(until=1)
    assert res.step == 1 and "no checkpoint in" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="already holds a run .*pass --resume"):
        TokenizerTrainer(_tokenizer_cfg(tmp_path, "run", precision="fp32"))


def test_bad_precision_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="train.precision: expected one of 'auto', 'fp32', 'bf16', got 'fp16'"):
        _tokenizer_cfg(tmp_path, "x", precision="fp16")


def test_the_quantizer_decides_signs_in_fp32_under_autocast():
    s = Schedule([(1, 1), (2, 2), (4, 4)], 1, 1, [1, 1, 1], [1, 1, 1], detail_min_tokens=16)
    z = torch.randn(2, 16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ref = encode_targets(z, s)
    with autocast(torch.device("cpu"), torch.bfloat16):
        q = quantize_multiscale(z.clone().requires_grad_(), s)
    assert q.codes.dtype == torch.float32 and torch.equal(q.codes.detach(), ref.codes)
    assert all(torch.equal(a, b) for a, b in zip(q.bits, ref.bits))


def test_bit_head_and_loss_stay_fp32_under_autocast():
    cfg = InfinityConfig(depth=1, width=64, num_heads=2, latent_channels=4, text_channels=16, text_maxlen=4,
                         num_levels=2, pooler_head_dim=16)
    torch.manual_seed(0)
    m = InfinityTransformer(cfg)
    scales = [(1, 1), (2, 2)]
    text, mask = torch.randn(2, 4, 16), torch.ones(2, 4, dtype=torch.bool)
    x, bits = torch.randn(2, 4, 4), torch.randint(0, 2, (2, 5, 4), dtype=torch.uint8)
    with autocast(torch.device("cpu"), torch.bfloat16):
        logits = m(text, mask, x, scales, rope_anchor=(2, 2))
        loss, acc = forward_loss(m, text, mask, x, bits, scales, rope_anchor=(2, 2))
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    ref, _ = forward_loss(m, text, mask, x, bits, scales, rope_anchor=(2, 2))
    assert torch.allclose(loss, ref, atol=0.05)   # bf16 blocks, fp32 head and loss: close to the fp32 forward


# --- the tokenizer's validation clips are held aside ----------------------------------------------------------
def _manifest(path, n, frames=9):
    path.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        np.save(path / f"v{i}.npy", np.full((frames, 16, 16, 3), 6 * i, np.uint8))
        lines.append(json.dumps({"video_path": f"v{i}.npy"}))
    (path / "m.jsonl").write_text("\n".join(lines) + "\n")
    return str(path / "m.jsonl")


def test_manifest_validation_comes_from_held_aside_videos(tmp_path):
    src = ManifestSource([_manifest(tmp_path / "a", 40)], 5, 16, 16, val_seed=7, val_samples=6, val_fraction=0.5)
    train_media = {it[1] for it in src.train_items}
    val_media = {it[1] for it in src.val_items}
    assert val_media and train_media and not train_media & val_media and len(train_media | val_media) == 40
    assert all(held_aside(it, 0.5) for it in src.val_items)
    # windows of a video are constant frames of value 6 * i: every clip names the video it came from
    val_ids = {int(c[0, 0, 0, 0]) // 6 for c in src.val_clips()}
    train_ids = {int(c[0, 0, 0, 0]) // 6 for s in range(5) for c in src.train_clips(s, 4)}
    held = {int(m.rsplit("v", 1)[1].split(".")[0]) for m in val_media}
    assert val_ids <= held and not train_ids & held


def test_explicit_validation_manifests_and_too_few_videos(tmp_path):
    src = ManifestSource([_manifest(tmp_path / "t", 3)], 5, 16, 16, 7, 2, val_manifests=[_manifest(tmp_path / "v", 1)])
    assert len(src.train_items) == 3 and len(src.val_items) == 1
    with pytest.raises(ConfigError, match="validation needs held-aside items"):
        ManifestSource([_manifest(tmp_path / "one", 1)], 5, 16, 16, 7, 2)
