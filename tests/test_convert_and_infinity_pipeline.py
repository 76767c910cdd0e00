"""`infinitystar convert` (four kinds of official files -> our folders) and the Infinity text-to-image pipeline.

Official-format files are written here from the parity fixtures' weights (official key names): an HF-sharded
folder, plain and nested .pth files, bf16 and wrapped-name variants.
"""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from infinitystar.cli import main as cli_main
from infinitystar.convert.cli import KINDS, convert, detect_kind, load_converted, read_official
from infinitystar.convert.infinity_official import load_official_infinity
from infinitystar.convert.official import load_official_transformer
from infinitystar.checkpoint_io import CheckpointError
from infinitystar.media import load_image
from infinitystar.model.infinity import InfinityTransformer
from infinitystar.pipelines.infinity import InfinityPipeline, parse_aspect_ratio
from infinitystar.model.infinitystar import InfinityStarTransformer
from infinitystar.pipelines.infinitystar import InfinityStarPipeline
from infinitystar.schedules.infinity_resolution import pixel_size, spatial_scales
from infinitystar.tokenizer.infinity_vae import InfinityVAE
from infinitystar.tokenizer.video_vae import VideoVAE

FIX = Path(__file__).parent / "fixtures"
WEIGHTS = {
    "infinitystar-transformer": FIX / "infinitystar" / "transformer" / "weights.safetensors",
    "infinity-transformer": FIX / "infinity" / "transformer" / "weights.safetensors",
    "video-vae": FIX / "infinitystar" / "vae" / "weights.safetensors",
    "infinity-vae": FIX / "infinity" / "vae" / "weights.safetensors",
}
STAR_TEXT_MAXLEN = 64     # the InfinityStar fixture's RoPE offset (not stored in weights)


def _write_official(kind: str, d: Path) -> Path:
    """One official-format file (or folder) per kind, in the form the release uses."""
    sd = load_file(str(WEIGHTS[kind]))
    if kind == "infinitystar-transformer":          # the 8B's HF-sharded folder
        folder = d / "infinitystar_8b_weights"
        folder.mkdir()
        keys = sorted(sd)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, ks in shards.items():
            save_file({k: sd[k] for k in ks}, str(folder / name))
        weight_map = {k: name for name, ks in shards.items() for k in ks}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return folder
    if kind == "infinity-transformer":              # a plain state dict .pth, in bf16
        path = d / "infinity_2b_reg.pth"
        torch.save({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}, path)
        return path
    if kind == "video-vae":                         # {"vae": ...} with the duplicated quantizer buffers
        path = d / "infinitystar_videovae.pth"
        torch.save({"vae": sd}, path)
        return path
    wrapped = json.loads((FIX / "infinity" / "vae" / "config.json").read_text())["plain_to_wrapper_key"]
    path = d / "infinity_vae_d16.pth"                # {"vae": ...} with the official module's wrapped names
    torch.save({"vae": {wrapped.get(k, k): v for k, v in sd.items()}}, path)
    return path


def _direct(kind: str, path: Path):
    """The official file loaded directly, by the existing loaders."""
    if kind == "infinitystar-transformer":
        return load_official_transformer(path, text_maxlen=STAR_TEXT_MAXLEN)
    if kind == "infinity-transformer":
        return load_official_infinity(path)
    if kind == "video-vae":
        return VideoVAE.from_official(path)
    return InfinityVAE.from_official(path)


def _from_dir(kind: str, d: Path):
    """The converted folder loaded by each module's own folder loader."""
    if kind == "infinitystar-transformer":
        return InfinityStarTransformer.from_pretrained(d)
    if kind == "infinity-transformer":
        return InfinityTransformer.from_pretrained(d)
    if kind == "video-vae":
        return VideoVAE.from_pretrained(d)
    return InfinityVAE.from_pretrained(d)


def _assert_identical(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert a.config == b.config


# --- conversion ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
def test_convert_round_trip_equals_direct_load(kind, tmp_path, capsys):
    src = _write_official(kind, tmp_path)
    dst = tmp_path / "converted"
    extra = ["--text-maxlen", str(STAR_TEXT_MAXLEN)] if kind == "infinitystar-transformer" else []
    kind_flag = ["--kind", kind] if kind == "infinity-transformer" else []      # the others are auto-detected
    assert cli_main(["convert", str(src), str(dst), *kind_flag, *extra]) == 0
    assert f"({kind}," in capsys.readouterr().out
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]
    converted = _from_dir(kind, dst)
    _assert_identical(converted, _direct(kind, src))
    _assert_identical(converted, load_converted(dst, kind))
    if kind != "infinitystar-transformer":          # the folder's config.json says what it holds
        assert type(load_converted(dst)) is type(converted)
    written = load_file(str(dst / "model.safetensors"))
    want = torch.bfloat16 if kind == "infinity-transformer" else torch.float32   # the checkpoint's own dtype
    assert {v.dtype for v in written.values() if v.is_floating_point()} == {want}
    assert not list(tmp_path.glob(".*converting*"))


def test_detect_kind_and_unknown_files(tmp_path, capsys):
    for kind, path in WEIGHTS.items():
        assert detect_kind(load_file(str(path))) == kind
    with pytest.raises(CheckpointError, match="cannot tell .* pass --kind, one of: infinitystar-transformer"):
        detect_kind({"fc.weight": torch.zeros(2, 2)})
    mixed = {**load_file(str(WEIGHTS["video-vae"])), "lvl_embed.weight": torch.zeros(2, 2)}
    with pytest.raises(CheckpointError, match="several models \\(infinity-transformer, video-vae\\)"):
        detect_kind(mixed)
    odd = tmp_path / "odd.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, str(odd))
    assert cli_main(["convert", str(odd), str(tmp_path / "out")]) == 2
    assert re.search("cannot tell which model", capsys.readouterr().err)
    # a training checkpoint's ['trainer']['gpt_fsdp'] is found and converted like the slim file
    sd = load_file(str(WEIGHTS["infinity-transformer"]))
    torch.save({"args": {}, "trainer": {"gpt_fsdp": sd}}, tmp_path / "ar-ckpt.pth")
    assert read_official(tmp_path / "ar-ckpt.pth").keys() == sd.keys()
    res = convert(tmp_path / "ar-ckpt.pth", tmp_path / "from_training")
    assert res.kind == "infinity-transformer" and res.dtype == torch.float32


def test_conversion_errors_are_clear(tmp_path, capsys):
    good = _write_official("video-vae", tmp_path)
    blob = good.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(blob[: len(blob) // 2])
    assert cli_main(["convert", str(truncated), str(tmp_path / "a")]) == 2
    assert re.search("truncated.pth: cannot read checkpoint", capsys.readouterr().err)
    st = tmp_path / "truncated.safetensors"
    st.write_bytes(WEIGHTS["infinity-vae"].read_bytes()[:5000])
    assert cli_main(["convert", str(st), str(tmp_path / "a")]) == 2
    assert re.search("cannot read checkpoint", capsys.readouterr().err)
    assert cli_main(["convert", str(tmp_path / "absent.pth"), str(tmp_path / "a")]) == 2
    assert re.search("no such file", capsys.readouterr().err)

    sd = load_file(str(WEIGHTS["infinity-transformer"]))
    del sd["head.weight"]
    torch.save(sd, tmp_path / "no_head.pth")
    assert cli_main(["convert", str(tmp_path / "no_head.pth"), str(tmp_path / "a")]) == 2
    assert re.search("missing keys: head.weight", capsys.readouterr().err)
    vae = load_file(str(WEIGHTS["video-vae"]))
    del vae["decoder.conv_out.conv.bias"]
    torch.save({"vae": vae}, tmp_path / "no_bias.pth")
    assert cli_main(["convert", str(tmp_path / "no_bias.pth"), str(tmp_path / "a")]) == 2
    assert re.search("missing keys: decoder.conv_out.conv.bias", capsys.readouterr().err)
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".*converting*"))

    assert cli_main(["convert", str(good), str(tmp_path / "a"), "--text-maxlen", "64"]) == 2
    assert re.search("--text-maxlen applies to infinitystar-transformer only", capsys.readouterr().err)
    assert cli_main(["convert", str(good), str(tmp_path / "a"), "--preset", "huge"]) == 2
    assert re.search("unknown video VAE preset", capsys.readouterr().err)
    assert cli_main(["convert", str(good), str(tmp_path / "a"), "--dtype", "bfloat16"]) == 0
    assert cli_main(["convert", str(good), str(tmp_path / "a")]) == 2
    assert re.search("already holds config.json, model.safetensors; pass --force", capsys.readouterr().err)
    assert cli_main(["convert", str(good), str(tmp_path / "a"), "--force", "--preset", "tiny"]) == 0


# --- the Infinity pipeline ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe():
    return InfinityPipeline.random_tiny(seed=0)


PROMPT = "a large red circle on a black background"


@pytest.mark.parametrize("ratio, template, warns", [(1.0, 1.0, False), ("16:9", 0.571, True), (2.0, 2.0, False),
                                                    ("3:4", 1.333, False), (0.36, 0.333, True)])
def test_aspect_ratios_snap_to_templates(pipe, recwarn, ratio, template, warns):
    g = lambda: torch.Generator().manual_seed(7)
    out = pipe(PROMPT, aspect_ratio=ratio, generator=g(), output_type="uint8")
    H, W = pixel_size(spatial_scales("0.06M", template), 4)       # random_tiny: 4 pixels per token
    assert out.template == template and (out.height, out.width) == (H, W)
    assert out.images[0].shape == (H, W, 3) and out.images[0].dtype == np.uint8
    snaps = [str(w.message) for w in recwarn if "snapped" in str(w.message)]
    assert bool(snaps) == warns
    if warns:
        assert f"template h/w {template}: generating {W}x{H} (WxH)" in snaps[0]
    assert np.array_equal(out.images[0], pipe(PROMPT, aspect_ratio=ratio, generator=g(), output_type="uint8").images[0])


def test_pipeline_sizes_seeds_and_errors(pipe):
    g = lambda s: torch.Generator().manual_seed(s)
    a, b = pipe(PROMPT, generator=g(1), output_type="np"), pipe(PROMPT, generator=g(2), output_type="np")
    assert not np.array_equal(a.images[0], b.images[0])
    pil = pipe(PROMPT, generator=g(1)).images[0]                       # diffusers' default for images: PIL
    assert pil.size == (64, 64) and np.array_equal(np.asarray(pil), pipe(PROMPT, generator=g(1),
                                                                        output_type="uint8").images[0])
    with pytest.warns(UserWarning, match="60x100 snapped to the nearest template h/w 1.75: generating 48x84"):
        out = pipe([PROMPT, "a small blue square on a white background"], height=100, width=60,
                   negative_prompt="a green triangle", guidance_scale=4.0, temperature=1.0, top_p=0.0,
                   num_images_per_prompt=2, output_type="np")
    assert out.images.shape == (4, 84, 48, 3) and not np.array_equal(out.images[0], out.images[1])
    assert pipe(PROMPT, pn="0.25M", output_type="pt").images.shape == (1, 3, 128, 128)
    assert parse_aspect_ratio("16:9") == 9 / 16 and parse_aspect_ratio("0.5") == 0.5
    for bad, msg in [("", "empty prompt"), ([], "empty prompt"), ([PROMPT, " "], "empty prompt")]:
        with pytest.raises(ValueError, match=msg):
            pipe(bad)
    for ratio, msg in [(10.0, "too far from the model's templates"), (0.1, "too far"), (0, "positive"),
                       (-2, "positive"), ("wide", "width:height"), (float("nan"), "positive")]:
        with pytest.raises(ValueError, match=msg):
            pipe(PROMPT, aspect_ratio=ratio)
    with pytest.raises(ValueError, match="both height and width"):
        pipe(PROMPT, height=64)
    with pytest.raises(ValueError, match="not both"):
        pipe(PROMPT, height=64, width=64, aspect_ratio=1.0)
    with pytest.raises(ValueError, match="unknown pixel budget"):
        pipe(PROMPT, pn="4M")
    with pytest.raises(ValueError, match="2 negative prompts given for 1 prompts"):
        pipe(PROMPT, negative_prompt=["a", "b"])


def test_callback_progress_bar_return_dict_and_interrupt(pipe, capsys):
    """The Infinity pipeline takes diffusers' call conventions as the video pipeline does."""
    g = lambda: torch.Generator().manual_seed(3)
    seen = []
    capsys.readouterr()
    out = pipe(PROMPT, generator=g(), output_type="codes",
               callback_on_step_end=lambda p, step, scale, kw: seen.append((step, scale, kw["num_steps"])))
    n = len(out.scales)
    assert seen == [(i, i, n) for i in range(n)]                 # one step per scale
    assert "generating" in capsys.readouterr().err                # a progress bar by default
    pipe.set_progress_bar_config(disable=True)
    try:
        images, = pipe(PROMPT, generator=g(), output_type="uint8", return_dict=False)
        assert capsys.readouterr().err == ""
    finally:
        pipe.set_progress_bar_config()
    assert np.array_equal(images, pipe(PROMPT, generator=g(), output_type="uint8").images)

    def stop(p, step, scale, kw):
        p._interrupt = step == 1

    cut = pipe(PROMPT, generator=g(), output_type="codes", callback_on_step_end=stop)
    assert len(cut.bits) == 2 and all(torch.equal(a, b) for a, b in zip(cut.bits, out.bits))
    assert pipe.interrupt


def test_pipeline_save_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "model_index.json").read_text())["family"] == "infinity"
    again = InfinityPipeline.from_pretrained(tmp_path / "model")
    g = lambda: torch.Generator().manual_seed(3)
    assert np.array_equal(pipe(PROMPT, aspect_ratio=0.5, generator=g(), output_type="uint8").images[0],
                          again(PROMPT, aspect_ratio=0.5, generator=g(), output_type="uint8").images[0])
    with pytest.raises(ValueError, match="holds a 'infinity' model"):
        InfinityStarPipeline.from_pretrained(tmp_path / "model")
    InfinityStarPipeline.random_tiny().save_pretrained(tmp_path / "star")
    with pytest.raises(ValueError, match="holds a 'infinitystar' model"):
        InfinityPipeline.from_pretrained(tmp_path / "star")
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        InfinityPipeline.from_pretrained(tmp_path)


def _tiny_t5(folder: Path, d_model: int) -> Path:
    """A flan-t5-shaped folder (config, safetensors weights, tokenizer files) with a tiny word-level vocabulary."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    words = "a large red circle on black background".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                               unk_token="<unk>")
    cfg = transformers.T5Config(d_model=d_model, num_layers=1, num_heads=2, d_kv=16, d_ff=64, vocab_size=len(vocab),
                                pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    transformers.T5EncoderModel(cfg).save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


def test_pipeline_with_a_t5_text_encoder(pipe, tmp_path):
    from infinitystar.text.t5 import T5TextEncoder
    t5_dir = _tiny_t5(tmp_path / "t5", 32)
    model = tmp_path / "model"
    t5 = T5TextEncoder.from_pretrained(t5_dir)
    InfinityPipeline(pipe.transformer, pipe.tokenizer, t5, pipe.defaults).save_pretrained(model)
    loaded = InfinityPipeline.from_pretrained(model)
    assert isinstance(loaded.text_encoder, T5TextEncoder)
    assert loaded(PROMPT, generator=torch.Generator().manual_seed(0)).images[0].size == (64, 64)


# --- the generate command for both families -------------------------------------------------------------------------
def test_generate_command_picks_the_pipeline_from_the_folder(pipe, tmp_path, capsys):
    pipe.save_pretrained(tmp_path / "infinity")
    png = tmp_path / "i.png"
    assert cli_main(["generate", "--model", str(tmp_path / "infinity"), "--prompt", PROMPT, "--out", str(png),
                     "--aspect-ratio", "16:9", "--seed", "5", "--json"]) == 0
    captured = capsys.readouterr()
    assert "note: aspect ratio '16:9' (h/w 0.5625) snapped to the nearest template h/w 0.571" in captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert (summary["width"], summary["height"], summary["template_h_div_w"]) == (84, 48, 0.571)
    assert load_image(png).shape == (48, 84, 3)
    with pytest.warns(UserWarning, match="snapped"):
        expected = pipe(PROMPT, aspect_ratio="16:9", generator=torch.Generator().manual_seed(5),
                        output_type="uint8").images[0]
    assert np.array_equal(load_image(png), expected)
    model = ["--model", str(tmp_path / "infinity"), "--prompt", PROMPT]
    for extra, msg in [(["--out", str(tmp_path / "v.mp4")], "must end in .png or .jpg"),
                       (["--out", str(png), "--frames", "5"], "--frames do not apply"),
                       (["--out", str(png), "--prompt", "a blue square"], "one image from one prompt"),
                       (["--out", str(png), "--aspect-ratio", "9"], "too far from the model's templates")]:
        assert cli_main(["generate", *model, *extra]) == 2
        assert msg in capsys.readouterr().err

    InfinityStarPipeline.random_tiny().save_pretrained(tmp_path / "star")
    star_png = tmp_path / "s.png"
    assert cli_main(["generate", "--model", str(tmp_path / "star"), "--prompt", "a red circle",
                     "--out", str(star_png)]) == 0
    assert load_image(star_png).shape == (64, 64, 3)
    assert cli_main(["generate", "--model", str(tmp_path / "star"), "--prompt", "a red circle", "--out",
                     str(star_png), "--aspect-ratio", "16:9"]) == 2
    assert "--aspect-ratio and --pn apply to Infinity" in capsys.readouterr().err


def test_converted_official_parts_make_a_pipeline(tmp_path):
    """The documented route: convert the transformer and the tokenizer, add a text encoder folder and a one-line
    model_index.json, generate."""
    from infinitystar.shapes.world import vocabulary
    from infinitystar.text.builtin import WordTextEncoder
    model = tmp_path / "infinity-model"
    for kind, sub in (("infinity-transformer", "transformer"), ("infinity-vae", "tokenizer")):
        assert cli_main(["convert", str(WEIGHTS[kind]), str(model / sub)]) == 0
    torch.manual_seed(0)    # the fixture reads 256-channel text of up to 16 tokens: a stand-in for flan-t5-xl
    WordTextEncoder(vocabulary(), width=256, depth=1, num_heads=2, max_len=16).save_pretrained(model / "text_encoder")
    (model / "model_index.json").write_text('{"family": "infinity"}')
    out = tmp_path / "x.png"
    assert cli_main(["generate", "--model", str(model), "--prompt", "a red circle", "--pn", "0.06M",
                     "--out", str(out)]) == 0
    assert load_image(out).shape == (256, 256, 3)


# --- an official release folder in one step -------------------------------------------------------------------------
def test_convert_a_release_folder(tmp_path, capsys):
    """Tiny weights in the released layout (names, shards, .pth entries, a flan-t5 folder) -> a model folder that
    the pipelines load, with model_index.json and a model card."""
    from infinitystar.pipelines import load
    from infinitystar.text.t5 import T5TextEncoder
    star = tmp_path / "InfinityStar"
    star.mkdir()
    _write_official("infinitystar-transformer", star).rename(star / "infinitystar_8b_480p_weights")
    _write_official("video-vae", star)
    _tiny_t5(star / "text_encoder" / "flan-t5-xl-official", 32)
    out = tmp_path / "infinitystar-480p"
    assert cli_main(["convert", "--release", str(star), str(out), "--text-maxlen", str(STAR_TEXT_MAXLEN)]) == 0
    assert "infinitystar_8b_480p_weights + infinitystar_videovae.pth + flan-t5-xl-official" in capsys.readouterr().out
    index = json.loads((out / "model_index.json").read_text())
    assert (index["family"], index["height"], index["width"]) == ("infinitystar", 480, 848)
    assert index["defaults"]["guidance"] == "apg" and index["defaults"]["guidance_scale"] == 34.0
    assert (index["defaults"]["tau_image"], index["defaults"]["tau_video"]) == (1.0, 0.4)
    card = (out / "README.md").read_text()
    for fact in ("**Source:** the official FoundationVision/InfinityStar release (480p): infinitystar_8b_480p_weights",
                 "**Licence:** not recorded", "**Written by:** infinitystar", "**Parity evidence:** every official "
                 "tensor mapped strictly", "transformer logits within 1.5e-6"):
        assert fact in card, fact
    pipe = load(out)
    assert type(pipe) is InfinityStarPipeline and isinstance(pipe.text_encoder, T5TextEncoder)
    _assert_identical(pipe.transformer, _direct("infinitystar-transformer", star / "infinitystar_8b_480p_weights"))
    _assert_identical(pipe.tokenizer, _direct("video-vae", star / "infinitystar_videovae.pth"))
    assert pipe.pyramid.spatial_scales()[-1] == (30, 53)

    inf = tmp_path / "Infinity"
    inf.mkdir()
    _write_official("infinity-transformer", inf)
    _write_official("infinity-vae", inf)
    _tiny_t5(inf / "flan-t5-xl", 256)
    assert cli_main(["convert", "--release", str(inf), str(tmp_path / "infinity-2b"), "--license", "mit"]) == 0
    index = json.loads((tmp_path / "infinity-2b" / "model_index.json").read_text())
    assert index["family"] == "infinity" and index["defaults"]["temperature"] == 0.5
    assert "license: mit\n" in (tmp_path / "infinity-2b" / "README.md").read_text()
    two_b = load(tmp_path / "infinity-2b")
    assert type(two_b) is InfinityPipeline
    assert two_b("a red circle", pn="0.06M", output_type="codes", generator=torch.Generator().manual_seed(0)
                 ).images.shape[0] == 1
    capsys.readouterr()

    # one-line errors, and nothing written
    for argv, msg in [([str(inf), str(tmp_path / "infinity-2b")], "already exists; pass --force"),
                      ([str(tmp_path / "nowhere"), str(tmp_path / "x")], "no such release folder"),
                      ([str(inf), str(tmp_path / "x"), "--kind", "video-vae"], "do not apply to --release")]:
        assert cli_main(["convert", "--release", *argv]) == 2
        assert msg in capsys.readouterr().err
    (inf / "infinity_vae_d16.pth").rename(inf / "vae.bin")
    assert cli_main(["convert", "--release", str(inf), str(tmp_path / "x")]) == 2
    assert "no infinity tokenizer (infinity_vae_*.pth) found; pass --vae PATH" in capsys.readouterr().err
    shutil.copy(inf / "infinity_2b_reg.pth", inf / "infinity_8b_reg.pth")
    assert cli_main(["convert", "--release", str(inf), str(tmp_path / "x"), "--vae", "vae.bin"]) == 2
    assert "several transformer" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".*converting*"))
