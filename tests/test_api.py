"""The user-facing API: top-level imports, one strict `from_pretrained` straight into a dtype, Hub repo ids, one
model-index reader, model cards, file permissions, and video files that play everywhere and are reproducible."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import infinitystar
from infinitystar import pipelines
from infinitystar.checkpoint_io import CheckpointError, init_empty, load_strict, read_tensors, write_tensors
from infinitystar.cli import main as cli_main
from infinitystar.media import MediaError, as_uint8, export_to_gif, export_to_video, load_video, save_image
from infinitystar.memory import MemoryOptions
from infinitystar.model.infinity import InfinityConfig, InfinityTransformer
from infinitystar.model.infinitystar import InfinityStarTransformer, TransformerConfig
from infinitystar.pipelines import InfinityPipeline, InfinityStarPipeline
from infinitystar.sampling.guidance import Guidance
from infinitystar.shapes.world import vocabulary
from infinitystar.text.builtin import WordTextEncoder
from infinitystar.tokenizer.infinity_vae import InfinityVAE, InfinityVAEConfig
from infinitystar.tokenizer.video_vae import VideoVAE, VideoVAEConfig

SRC = str(Path(infinitystar.__file__).resolve().parents[1])


def _python(code: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True,
                          env=env, timeout=300).stdout


# --- top-level names --------------------------------------------------------------------------------------------------
def test_top_level_exports_are_lazy():
    out = _python("import sys, infinitystar; print('torch' in sys.modules)\n"
                  "from infinitystar import InfinityStarPipeline, InfinityPipeline, export_to_video, export_to_gif, "
                  "load_image, load_video\n"
                  "print(InfinityStarPipeline.__module__, export_to_gif.__module__, 'torch' in sys.modules)")
    assert out.split() == ["False", "infinitystar.pipelines.infinitystar", "infinitystar.media", "True"]
    assert infinitystar.InfinityPipeline is InfinityPipeline and infinitystar.load_pipeline is pipelines.load
    assert infinitystar.MemoryOptions is MemoryOptions and infinitystar.Guidance is Guidance
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        infinitystar.Nope


def test_the_package_runs_without_pyav_until_a_video_file_is_touched():
    # a GPU image without PyAV still generates and trains; only .mp4 reading/writing needs it, with a clear error
    out = _python("import sys; sys.modules['av'] = None\n"
                  "import numpy as np, infinitystar.pipelines, infinitystar.train.data, infinitystar.bench\n"
                  "from infinitystar.media import MediaError, export_to_video\n"
                  "try:\n    export_to_video(np.zeros((2, 8, 8, 3), np.uint8), 'x.mp4')\n"
                  "except MediaError as e:\n    print(e)")
    assert out.strip() == "reading or writing .mp4 needs PyAV: pip install av"


# --- one from_pretrained for every module --------------------------------------------------------------------------
def _modules():
    torch.manual_seed(0)
    text = WordTextEncoder(vocabulary(), width=32, depth=1, num_heads=2)
    return [InfinityStarTransformer(TransformerConfig(width=64, depth=2, num_heads=2, text_channels=32,
                                                      text_maxlen=8, null_text_len=8, latent_channels=16,
                                                      semantic_bits=4)),
            InfinityTransformer(InfinityConfig.preset("tiny")), VideoVAE(VideoVAEConfig.small()),
            InfinityVAE(InfinityVAEConfig.preset("tiny")), text]


@pytest.mark.parametrize("index", range(5))
def test_from_pretrained_straight_into_a_dtype(tmp_path, index):
    module = _modules()[index].eval()
    cls = type(module)
    module.save_pretrained(tmp_path / "fp32")
    saved = {"fp32": {k: v.clone() for k, v in module.state_dict().items()}}
    module.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")      # a bf16 folder, as `convert` keeps releases
    saved["bf16"] = module.state_dict()
    cast = lambda t, dtype: t.to(dtype) if t.is_floating_point() else t
    for folder in ("fp32", "bf16"):
        for dtype in (None, torch.bfloat16):
            loaded = cls.from_pretrained(tmp_path / folder, torch_dtype=dtype, device="cpu")
            assert not loaded.training
            sd = loaded.state_dict()
            assert sd.keys() == saved[folder].keys()
            for k, v in sd.items():      # None: the dtype the module is built in (float32)
                want = cast(saved[folder][k], dtype or torch.float32)
                assert v.dtype == want.dtype and torch.equal(v, want), (folder, dtype, k)
                assert not v.is_meta and v.device.type == "cpu"
            assert all(p.requires_grad for p in loaded.parameters())
    if hasattr(module, "rope"):        # RoPE frequencies are no parameters and stay exact float32
        assert loaded.rope.inv_freq.dtype == torch.float32


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak memory is read from Linux /proc")
def test_from_pretrained_never_materialises_fp32(tmp_path):
    """Loading a bf16 folder as bf16 needs about the file's size; building in fp32 and casting needs ~3x."""
    cfg = TransformerConfig(width=1024, depth=2, num_heads=8, text_channels=1024, text_maxlen=64, null_text_len=64,
                            latent_channels=64, semantic_bits=16)
    with init_empty():
        shapes = {k: v.shape for k, v in InfinityStarTransformer(cfg).state_dict().items()}
    numel = sum(s.numel() for s in shapes.values())
    sd = {k: torch.zeros(s, dtype=torch.bfloat16) for k, s in shapes.items()}
    d = tmp_path / "big"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"type": "infinitystar_transformer", **cfg.to_dict()}))
    write_tensors(d / "model.safetensors", sd)
    del sd
    code = ("import sys, torch\n"
            "from infinitystar.model.infinitystar import InfinityStarTransformer, TransformerConfig\n"
            "from infinitystar.checkpoint_io import read_config, read_tensors, load_strict\n"
            "torch.set_num_threads(1)\n"
            "def rss(field):\n"
            "    line = next(x for x in open('/proc/self/status') if x.startswith(field))\n"
            "    return int(line.split()[1]) * 1024\n"
            "open('/proc/self/clear_refs', 'w').write('5')    # restart the peak (VmHWM) count here\n"
            "base = rss('VmRSS:')\n"
            "if sys.argv[2] == 'ours':\n"
            "    m = InfinityStarTransformer.from_pretrained(sys.argv[1], torch_dtype=torch.bfloat16)\n"
            "else:\n"
            "    m = InfinityStarTransformer(TransformerConfig.from_dict(read_config(sys.argv[1], "
            "'infinitystar_transformer', 't')))\n"
            "    load_strict(m, read_tensors(sys.argv[1] + '/model.safetensors'))\n"
            "    m = m.to(torch.bfloat16)\n"
            "assert {p.dtype for p in m.parameters()} == {torch.bfloat16}\n"
            "print(rss('VmHWM:') - base)\n")
    ours, plain = (int(_python(code, str(d), how)) for how in ("ours", "plain"))
    size = 2 * numel
    assert ours < 2.2 * size, (ours, size)          # the file's tensors (plus the mapped file pages at most)
    assert ours < 0.6 * plain, (ours, plain)


def test_strict_loading_names_the_problem(tmp_path):
    module = _modules()[4]
    module.save_pretrained(tmp_path / "t")
    sd = read_tensors(tmp_path / "t" / "model.safetensors")
    sd["extra.weight"] = torch.zeros(2)
    sd["norm.weight"] = torch.zeros(3)
    del sd["pos"]
    write_tensors(tmp_path / "t" / "model.safetensors", sd)
    with pytest.raises(CheckpointError, match="missing keys: pos; unexpected keys: extra.weight; mis-shaped keys: "
                                              "norm.weight \\(checkpoint \\(3,\\), model \\(32,\\)\\)"):
        WordTextEncoder.from_pretrained(tmp_path / "t")
    (tmp_path / "t" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not a JSON file"):
        WordTextEncoder.from_pretrained(tmp_path / "t")
    (tmp_path / "t" / "config.json").write_text(json.dumps({"type": "video_vae"}))
    with pytest.raises(CheckpointError, match="type 'video_vae' is not 'builtin'"):
        WordTextEncoder.from_pretrained(tmp_path / "t")
    (tmp_path / "t" / "config.json").write_text(json.dumps({"type": "builtin", "vocab": ["a"], "widht": 3}))
    with pytest.raises(CheckpointError, match="not a valid built-in text encoder config .*widht"):
        WordTextEncoder.from_pretrained(tmp_path / "t")
    (tmp_path / "t" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="not a built-in text encoder folder, missing model.safetensors"):
        WordTextEncoder.from_pretrained(tmp_path / "t")
    plain = WordTextEncoder(vocabulary(), width=32, depth=1, num_heads=2)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_strict(plain, {})


# --- model folders: one index reader, the Hub, the card, permissions -------------------------------------------------
@pytest.fixture(scope="module")
def star_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("star") / "model"
    InfinityStarPipeline.random_tiny(seed=0).save_pretrained(d)
    return d


def test_load_reads_the_model_index_once(star_folder, tmp_path, monkeypatch):
    InfinityPipeline.random_tiny(seed=0).save_pretrained(tmp_path / "infinity")
    assert type(pipelines.load(star_folder)) is InfinityStarPipeline
    p = pipelines.load(tmp_path / "infinity", torch_dtype=torch.bfloat16)
    assert type(p) is InfinityPipeline and p.dtype == torch.bfloat16
    calls = []
    real = pipelines.base.read_model_index
    monkeypatch.setattr(pipelines.base, "read_model_index", lambda d: calls.append(d) or real(d))
    import infinitystar.generation as gen
    monkeypatch.setattr(gen, "read_model_index", pipelines.base.read_model_index)
    for model, out in ((star_folder, "v.mp4"), (tmp_path / "infinity", "i.png")):
        calls.clear()
        assert cli_main(["generate", "--model", str(model), "--prompt", "a red circle", "--out",
                         str(tmp_path / out), "--frames" if out == "v.mp4" else "--seed", "5", "--json"]) == 0
        assert len(calls) == 1
    bad = tmp_path / "bad"
    bad.mkdir()
    for text, msg in [("[1]", "expected a JSON object"), ('{"family": "sd"}', "unknown family 'sd'"),
                      ('{"family": "infinitystar", "height": "64"}', "missing field 'pyramid'")]:
        (bad / "model_index.json").write_text(text)
        with pytest.raises((ValueError, FileNotFoundError), match=msg):
            pipelines.load(bad)


def test_hub_repo_id_from_a_local_cache(star_folder, tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")         # never the network
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-star"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.parent.mkdir()
    import shutil
    shutil.copytree(star_folder, snapshot)
    pipe = InfinityStarPipeline.from_pretrained("someone/tiny-star", cache_dir=tmp_path / "hub",
                                                local_files_only=True)
    ref = InfinityStarPipeline.from_pretrained(star_folder)
    assert torch.equal(pipe.transformer.null_text, ref.transformer.null_text)
    assert type(pipelines.load("someone/tiny-star", cache_dir=tmp_path / "hub", local_files_only=True)) \
        is InfinityStarPipeline
    with pytest.raises(FileNotFoundError, match="someone/absent: no such folder, and not found on the Hugging Face"):
        InfinityStarPipeline.from_pretrained("someone/absent", cache_dir=tmp_path / "hub", local_files_only=True)


def test_save_pretrained_writes_a_card_and_respects_the_umask(tmp_path):
    pipe = InfinityStarPipeline.random_tiny(seed=0)
    pipe.card = pipelines.ModelCard(source="a test", license="mit", parity="none (random weights)")
    old = os.umask(0o022)
    try:
        pipe.save_pretrained(tmp_path / "shared")
        os.umask(0o077)
        pipe.save_pretrained(tmp_path / "private")
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "shared").rglob("*") if p.is_file()]
    assert {p.relative_to(tmp_path / "shared").as_posix() for p in files} >= {
        "README.md", "model_index.json", "transformer/model.safetensors", "text_encoder/config.json"}
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}
    assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "private").rglob("*") if p.is_file()} == {"0o600"}
    card = (tmp_path / "shared" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: infinitystar\nlicense: mit\npipeline_tag: text-to-video\n")
    for fact in ("**Source:** a test", "**Licence:** mit", f"infinitystar {infinitystar.__version__}",
                 "**Parity evidence:** none (random weights)", "| `transformer/` | InfinityStarTransformer |"):
        assert fact in card
    index = json.loads((tmp_path / "shared" / "model_index.json").read_text())
    assert index["_infinitystar_version"] == infinitystar.__version__ and index["card"]["source"] == "a test"
    assert InfinityStarPipeline.from_pretrained(tmp_path / "shared").card == pipe.card


def test_generate_flags_reach_the_pipeline_and_the_device_is_checked_first(tmp_path, capsys):
    def run(name, *extra):
        assert cli_main(["generate", "--prompt", "a red circle moving up slowly on a gray background", "--out",
                         str(tmp_path / name), "--frames", "5", "--seed", "2", "--json", *extra]) == 0
        return np.load(tmp_path / name)

    plain = run("a.npy")
    negative = run("b.npy", "--negative-prompt", "a blue square")
    assert np.array_equal(negative, run("c.npy", "--negative-prompt", "a blue square"))
    assert not np.array_equal(plain, negative)
    capsys.readouterr()
    # a device this machine lacks is reported before the (missing) model folder is even looked at
    assert cli_main(["generate", "--prompt", "a red circle", "--out", str(tmp_path / "d.mp4"), "--device", "bogus",
                     "--model", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'bogus'" in err and "nowhere" not in err
    assert not (tmp_path / "d.mp4").exists()


# --- media --------------------------------------------------------------------------------------------------------
def _stream(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return s.codec_context.name, s.codec_context.pix_fmt, s.average_rate, s.frames


def _frames(seed=0, T=9, H=64, W=64):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, H // 8, W // 8, 3), dtype=np.uint8).repeat(8, 1).repeat(8, 2)
    return np.concatenate([np.roll(base, t, axis=2) for t in range(T)])


def test_videos_play_everywhere_and_are_reproducible(tmp_path):
    frames = _frames()
    np.save(tmp_path / "frames.npy", frames)
    # the first encode of a fresh process, then several in this one: the same frames give the same bytes
    _python("import sys, numpy as np; from infinitystar.media import export_to_video\n"
            "export_to_video(np.load(sys.argv[1]), sys.argv[2], fps=12)", str(tmp_path / "frames.npy"),
            str(tmp_path / "fresh.mp4"))
    a = export_to_video(frames, tmp_path / "a.mp4", fps=12)
    assert _stream(a)[:3] == ("h264", "yuv420p", 12)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    again = {digest(export_to_video(frames, tmp_path / f"b{i}.MP4", fps=12)) for i in range(8)}
    assert again == {digest(a)} == {digest(tmp_path / "fresh.mp4")}
    assert np.abs(load_video(a).astype(int) - frames).mean() < 12     # chroma at half resolution
    exact = export_to_video(frames, tmp_path / "exact.mp4", lossless=True)
    assert _stream(exact)[1] == "gbrp" and np.array_equal(load_video(exact), frames)     # RGB 4:4:4, lossless
    assert _stream(export_to_video(frames, tmp_path / "c.mp4", pix_fmt="yuv444p"))[1] == "yuv444p"
    assert np.array_equal(load_video(export_to_video(frames / 255.0, tmp_path / "f.mp4", lossless=True)), frames)
    with pytest.warns(UserWarning, match="odd size 63x61 padded to even"):
        odd = export_to_video(frames[:, :61, :63], tmp_path / "odd.mp4")
    assert load_video(odd).shape == (9, 62, 64, 3)
    for bad, msg in [(dict(path=tmp_path / "x.avi"), "unsupported video file x.avi"),
                     (dict(fps=-3), "fps must be a positive number"),
                     (dict(path=tmp_path / "no" / "x.mp4"), "folder .* does not exist"),
                     (dict(frames=frames * 2.0), "must lie in \\[0, 1\\]")]:
        kw = {"frames": frames, "path": tmp_path / "x.mp4", **bad}
        with pytest.raises(MediaError, match=msg):
            export_to_video(kw.pop("frames"), kw.pop("path"), **kw)


def test_gif_images_and_permissions(tmp_path):
    frames = _frames(T=4)
    old = os.umask(0o022)
    try:
        gif = export_to_gif(list(Image.fromarray(f) for f in frames), tmp_path / "a.gif", fps=10)
        png = save_image(frames[0] / 255.0, tmp_path / "a.png")
        mp4 = export_to_video(frames, tmp_path / "a.mp4")
    finally:
        os.umask(old)
    with Image.open(gif) as im:
        assert im.n_frames == 4 and im.info["duration"] == 100 and im.info["loop"] == 0
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), frames[0])
    assert {oct(p.stat().st_mode & 0o777) for p in (gif, png, mp4)} == {"0o644"}
    assert hashlib.sha256(gif.read_bytes()).digest() == hashlib.sha256(
        export_to_gif(frames, tmp_path / "b.gif", fps=10).read_bytes()).digest()
    assert as_uint8(torch.ones(2, 2, 3)).max() == 255
    with pytest.raises(MediaError, match="must be uint8, or float"):
        as_uint8(np.zeros((2, 2, 3), np.int64))
