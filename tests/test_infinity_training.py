"""The tiny Infinity on Shapes World: 2-D tokenizer training, transformer training (resume, export), the
custom-scale pipeline, config errors. Tiny configs, a few steps, CPU."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from infinitystar.train.infinity import InfinityTrainer, config_from_dict as transformer_config, replace_tokenizer
from infinitystar.pipelines.infinity import InfinityDefaults, InfinityPipeline
from infinitystar.shapes.world import vocabulary
from infinitystar.text.builtin import WordTextEncoder
from infinitystar.tokenizer.infinity_vae import InfinityVAE, InfinityVAEConfig
from infinitystar.tokenizer.training_eval import frames_to_video
from infinitystar.train.infinity_tokenizer import (SCALES_FILE, SHAPES_SCALES, InfinityTokenizerTrainer, SHAPES_VAE,
                                                   config_from_dict as tokenizer_config, quantize_image_latent)
from infinitystar.train.tokenizer_data import ShapesSource
from infinitystar.train.config import ConfigError

QUIET = {"progress": False, "every": 1}


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A random-weight Shapes tokenizer and a tiny word encoder (the transformer trainer's frozen inputs)."""
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    InfinityVAE(InfinityVAEConfig.from_dict(SHAPES_VAE)).save_pretrained(root / "tokenizer")
    WordTextEncoder(vocabulary(), width=32, depth=1, num_heads=2, max_len=16).save_pretrained(root / "text")
    return root


def _transformer_cfg(parts, out, **train):
    return transformer_config({
        "output_dir": str(out), "device": "cpu", "tokenizer": str(parts / "tokenizer"),
        "text_encoder": str(parts / "text"), "model": {"depth": 1, "width": 64, "num_heads": 2, "pooler_head_dim": 16},
        "train": {"max_steps": 4, "batch_size": 2, "ema_decay": 0.9, "precision": "fp32", **train},
        "checkpoint": {"every": 2, "keep_last": 0}, "log": QUIET})


def test_tokenizer_trains_and_writes_a_loadable_model(tmp_path):
    cfg = tokenizer_config({"output_dir": str(tmp_path / "tok"), "device": "cpu",
                            "train": {"max_steps": 2, "batch_size": 2, "val_every": 0},
                            "data": {"val_samples": 2}, "quant": {"calibration_clips": 2},
                            "checkpoint": {"every": 1}, "log": QUIET})
    res = InfinityTokenizerTrainer(cfg).fit()
    assert res.step == 2 and res.val_psnr is not None
    vae = InfinityVAE.from_pretrained(res.model_dir)
    assert vae.config.patch_size == 8 and vae.config.codebook_dim == 16
    assert json.loads((res.model_dir / SCALES_FILE).read_text())["scales"][-1] == [8, 8]
    assert vae.encode(torch.zeros(1, 3, 64, 64)).shape == (1, 16, 8, 8)
    lines = [json.loads(s) for s in (tmp_path / "tok" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2] and "calibration" in lines[0]
    # the video tokenizer's resume machinery works for it too
    cfg2 = tokenizer_config({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "max_steps": 3}})
    assert InfinityTokenizerTrainer(cfg2, resume="latest").fit().step == 3


def test_transformer_resume_is_bit_identical_and_exports_a_pipeline(parts, tmp_path):
    straight = InfinityTrainer(_transformer_cfg(parts, tmp_path / "a")).fit()
    assert straight.step == 4 and np.isfinite(straight.loss)
    InfinityTrainer(_transformer_cfg(parts, tmp_path / "b")).fit(until=2)
    resumed = InfinityTrainer(_transformer_cfg(parts, tmp_path / "b"), resume="latest").fit()
    assert resumed.step == 4
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(tmp_path / "a" / "checkpoints" / "step_00000004" / name))
        b = load_file(str(tmp_path / "b" / "checkpoints" / "step_00000004" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a = [json.loads(s)["loss"] for s in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    log_b = [json.loads(s)["loss"] for s in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert log_a == log_b

    pipe = InfinityPipeline.from_pretrained(straight.model_dir)
    assert pipe.defaults.scales[-1] == [8, 8]
    out = pipe("a large red circle on a black background", generator=torch.Generator().manual_seed(0),
               output_type="uint8")
    assert out.images[0].shape == (64, 64, 3) and out.images[0].dtype == np.uint8 and out.pn == "custom"
    with pytest.raises(ValueError, match="only 64x64"):
        pipe("a large red circle on a black background", pn="0.06M")


def test_generate_cli_runs_an_exported_folder(parts, tmp_path):
    from infinitystar.cli import main
    res = InfinityTrainer(_transformer_cfg(parts, tmp_path / "run", ema_decay=None)).fit()
    assert main(["generate", "--model", str(res.model_dir), "--prompt", "a small blue square on a white background",
                 "--out", str(tmp_path / "x.png")]) == 0
    from PIL import Image
    assert Image.open(tmp_path / "x.png").size == (64, 64)


def _bits(vae: InfinityVAE, images: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return quantize_image_latent(vae.encode(images), SHAPES_SCALES).bits


def test_decoder_finetune_from_init_keeps_encoder_and_bits(parts, tmp_path):
    """init + freeze [encoder]: strict load, no calibration, the encoder and the bits of a batch bit-identical, the
    decoder changed; the result swaps into an exported model folder: the same codes, other pixels."""
    init = parts / "tokenizer"
    cfg = tokenizer_config({"output_dir": str(tmp_path / "dec"), "device": "cpu", "init": str(init),
                            "optim": {"lr": 1e-2, "warmup_steps": 0},
                            "train": {"max_steps": 3, "batch_size": 2, "val_every": 0, "freeze": ["encoder"]},
                            "data": {"val_samples": 2}, "checkpoint": {"every": 0}, "log": QUIET})
    assert cfg.calibrates() is False and cfg.vae_config() == InfinityVAE.from_pretrained(init).config
    trainer = InfinityTokenizerTrainer(cfg)
    assert trainer.calibration is None
    old = InfinityVAE.from_pretrained(init)
    start = trainer.model.state_dict()
    assert all(torch.equal(v, start[k]) for k, v in old.state_dict().items())   # loaded as saved
    res = trainer.fit()
    new = InfinityVAE.from_pretrained(res.model_dir)
    a, b = old.state_dict(), new.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("encoder."))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))
    images = frames_to_video(ShapesSource(1, 64, 64, 0, 0).train_clips(7, 3), "cpu")[:, :, 0]
    assert all(torch.equal(x, y) for x, y in zip(_bits(old, images), _bits(new, images)))
    assert json.loads((res.model_dir / "tokenizer_training.json").read_text())["init"] == str(init)

    pipe_dir = InfinityTrainer(_transformer_cfg(parts, tmp_path / "t", ema_decay=None)).fit().model_dir
    swapped = replace_tokenizer(pipe_dir, res.model_dir, tmp_path / "swapped")
    outs = [InfinityPipeline.from_pretrained(d)(["a large red circle on a black background"] * 2,
                                                generator=torch.Generator().manual_seed(3)) for d in (pipe_dir, swapped)]
    assert torch.equal(outs[0].codes, outs[1].codes)
    assert any(not np.array_equal(x, y) for x, y in zip(outs[0].images, outs[1].images))
    record = json.loads((swapped / "infinity_training.json").read_text())["tokenizer_replaced"]
    assert record["tokenizer"] == str(res.model_dir) and record["changed_tensors"] > 0

    moved = InfinityVAE.from_pretrained(res.model_dir)   # an encoder that moved cannot replace the tokenizer
    with torch.no_grad():
        moved.encoder.conv_out.weight.mul_(2)
    moved.save_pretrained(tmp_path / "moved")
    with pytest.raises(ValueError, match="its encoder differs"):
        replace_tokenizer(pipe_dir, tmp_path / "moved", tmp_path / "bad")


def test_init_folder_is_loaded_strictly(parts, tmp_path):
    folder = tmp_path / "wrong"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((parts / "tokenizer" / "model.safetensors").read_bytes())
    raw = json.loads((parts / "tokenizer" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "base_ch": 48}))   # the tensors do not fit
    cfg = tokenizer_config({"output_dir": str(tmp_path / "run"), "device": "cpu", "init": str(folder),
                            "data": {"val_samples": 2}, "log": QUIET})
    with pytest.raises(ConfigError, match="init: "):
        InfinityTokenizerTrainer(cfg)


@pytest.mark.parametrize("raw, match", [
    ({"modle": {}}, "did you mean 'model'"),
    ({"model": {"latent_channels": 8}}, "set by the trainer"),
    ({"model": {"widht": 64}}, "model.widht: unknown key"),
    ({"train": {"bsc_strenght": 0.1}}, "train.bsc_strenght: unknown key"),
    ({"train": {"cond_drop_rate": 2.0}}, r"cond_drop_rate must be in \[0, 1\]"),
    ({"scales": [[2, 2], [8, 8]]}, "first scale must be"),
    ({"scales": [[1, 1], [8, 8], [4, 4]]}, "must grow"),
    ({"optim": {"lr": "fast"}}, "optim.lr: expected a number"),
])
def test_transformer_config_errors(raw, match):
    with pytest.raises(ConfigError, match=match):
        transformer_config(raw)


@pytest.mark.parametrize("raw, match", [
    ({"model": {"bse_ch": 3}}, "model.bse_ch: unknown key"),
    ({"model": {"preset": "huge"}}, "unknown preset"),
    ({"quant": {"sample_posterior": True}}, "no posterior"),
    ({"train": {"freeze": ["proj"]}}, "unknown part"),
    ({"scales": [[1, 1], [4, 4]]}, "must be the latent size"),
    ({"init": "/nonexistent/tokenizer"}, "init: .* is not a tokenizer folder"),
    ({"train": {"freeze": ["encoder"]}}, r"calibrate_scale \(on by default without init\) rescales the encoder"),
    ({"train": {"freeze": ["encoder", "decoder"]}, "quant": {"calibrate_scale": False}}, "everything would be frozen"),
])
def test_tokenizer_config_errors(raw, match):
    with pytest.raises(ConfigError, match=match):
        tokenizer_config(raw)


def test_missing_tokenizer_folder_is_a_clear_error(parts, tmp_path):
    cfg = transformer_config({"output_dir": str(tmp_path), "device": "cpu", "tokenizer": str(tmp_path / "nope"),
                              "text_encoder": str(parts / "text")})
    with pytest.raises(ConfigError, match="train the tokenizer first"):
        InfinityTrainer(cfg)


def test_custom_scales_are_validated():
    with pytest.raises(ValueError, match="defaults.scales"):
        InfinityDefaults(scales=[[1, 1], [0, 2]])
