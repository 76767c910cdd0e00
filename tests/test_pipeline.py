"""The pipeline and the generate command, on a tiny random-weight model (every code path, no quality claims)."""
import dataclasses
import json
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from infinitystar.cli import main as cli_main
from infinitystar.media import load_video
from infinitystar.pipelines.infinitystar import InfinityStarPipeline
from infinitystar.runtime import UserError
from infinitystar.sampling.guidance import Guidance

PROMPT = "a large red circle moving right quickly on a black background"


@pytest.fixture(scope="module")
def pipe():
    p = InfinityStarPipeline.random_tiny(seed=0)
    p.precision = "fp32"
    return p


def g(seed):
    return torch.Generator().manual_seed(seed)


def test_tasks_shapes_and_seeds(pipe):
    a = pipe(PROMPT, num_frames=17, generator=g(1), output_type="uint8")
    b = pipe(PROMPT, num_frames=17, generator=g(1), output_type="uint8")
    assert a.frames[0].shape == (17, 64, 64, 3) and a.frames[0].dtype == np.uint8
    assert np.array_equal(a.frames[0], b.frames[0])
    t2i = pipe(["a red circle on a black background", "a blue square on a white background"], num_frames=1,
               output_type="uint8")
    assert len(t2i.images) == 2 and t2i.images[0].shape == (64, 64, 3)
    story = pipe([["a red circle moving right slowly on a black background",
                   "a red circle moving up slowly on a black background"]], num_frames=33, output_type="uint8")
    assert story.frames[0].shape == (33, 64, 64, 3)


def test_first_frame_all_prompts_lets_the_first_frame_read_later_segments(pipe):
    """Off (the official layout), a video's first frame reads only the first segment's prompt; with the model's
    `first_frame_all_prompts` default it reads every segment's (where it starts must fit the whole path)."""
    first, *later = ("a red circle moving right slowly on a black background",
                     "a red circle moving up slowly on a black background",
                     "a red circle moving left quickly on a black background")
    def frame0(second):
        return pipe([[first, second]], num_frames=33, generator=g(3), output_type="uint8").frames[0][0]
    assert np.array_equal(frame0(later[0]), frame0(later[1]))
    old = pipe.defaults
    pipe.defaults = dataclasses.replace(old, first_frame_all_prompts=True)
    try:
        assert not np.array_equal(frame0(later[0]), frame0(later[1]))
    finally:
        pipe.defaults = old
    with pytest.raises(ValueError, match="first_frame_all_prompts must be true or false"):
        dataclasses.replace(old, first_frame_all_prompts="yes")


def test_output_types(pipe):
    kw = dict(num_frames=5, generator=None)
    outs = {t: pipe(PROMPT, output_type=t, **{**kw, "generator": g(2)})
            for t in ("np", "uint8", "pt", "pil", "codes")}
    np_frames = outs["np"].frames
    assert np_frames.shape == (1, 5, 64, 64, 3) and np_frames.dtype == np.float32       # diffusers: float in [0, 1]
    assert 0.0 <= np_frames.min() and np_frames.max() <= 1.0
    assert np.array_equal((np_frames * 255).round().astype(np.uint8), outs["uint8"].frames)
    assert outs["pt"].frames.shape == (1, 5, 3, 64, 64)                                 # diffusers: (B, T, C, H, W)
    assert np.allclose(outs["pt"].frames.permute(0, 1, 3, 4, 2).numpy(), np_frames)
    pil = outs["pil"].frames
    assert len(pil) == 1 and len(pil[0]) == 5 and isinstance(pil[0][0], Image.Image)
    assert np.array_equal(np.asarray(pil[0][3]), outs["uint8"].frames[0, 3])
    assert torch.equal(outs["codes"].frames, outs["np"].codes)                          # no decoding
    assert outs["codes"].frames.shape[:3] == (1, pipe.transformer.config.latent_channels, 2)
    frames, = pipe(PROMPT, return_dict=False, output_type="uint8", **{**kw, "generator": g(2)})
    assert np.array_equal(frames, outs["uint8"].frames)
    assert outs["np"][0] is outs["np"].frames
    with pytest.raises(ValueError, match="unknown output_type 'latent'"):
        pipe(PROMPT, num_frames=1, output_type="latent")


def test_videos_per_prompt_generators_and_negative_prompts(pipe):
    kw = dict(num_frames=5, output_type="codes")
    two = pipe([PROMPT, "a small blue square moving up slowly on a white background"], num_videos_per_prompt=2,
               generator=[g(0), g(1), g(2), g(3)], **kw)
    assert two.codes.shape[0] == 4
    alone = pipe(PROMPT, generator=g(1), **kw)
    # with a list, output i depends on generator i alone: the 2nd output equals a batch of one with the same seed
    assert all(torch.equal(a[1], b[0]) for a, b in zip(two.bits, alone.bits))
    assert not torch.equal(two.codes[0], two.codes[1])
    with pytest.raises(ValueError, match="3 generators given for 4 outputs"):
        pipe([PROMPT, PROMPT], num_videos_per_prompt=2, generator=[g(0)] * 3, **kw)
    with pytest.raises(ValueError, match="num_videos_per_prompt must be a positive integer"):
        pipe(PROMPT, num_videos_per_prompt=0, **kw)
    neg = pipe(PROMPT, negative_prompt="a green triangle standing still", generator=g(1), **kw)
    assert not torch.equal(neg.codes, alone.codes)
    assert torch.equal(pipe(PROMPT, negative_prompt="a green triangle standing still", generator=g(1), **kw).codes,
                       neg.codes)
    with pytest.raises(ValueError, match="2 negative prompts given for 1 prompts"):
        pipe(PROMPT, negative_prompt=["a", "b"], **kw)
    with pytest.raises(ValueError, match="empty negative prompt"):
        pipe(PROMPT, negative_prompt=" ", **kw)


def test_guidance_settings(pipe):
    kw = dict(num_frames=1, output_type="codes", generator=None)
    run = lambda **a: pipe(PROMPT, **{**kw, "generator": g(5), **a}).codes
    base = run()
    n = len(pipe.pyramid.build(1).scales)
    assert torch.equal(run(guidance_scale=[pipe.defaults.guidance_scale] * n), base)     # per-scale = constant
    apg = Guidance(4.0, "apg", apg_eta=0.0)
    assert not torch.equal(run(guidance=apg), run(guidance=Guidance(4.0)))
    assert not torch.equal(run(guidance=apg), run(guidance=dataclasses.replace(apg, apg_eta=1.0)))
    assert torch.equal(run(guidance=apg, guidance_scale=2.0), run(guidance=dataclasses.replace(apg, scale=2.0)))
    with pytest.raises(ValueError, match=f"one value per scale \\({n}\\), got 2"):
        run(guidance_scale=[1.0, 2.0])
    for bad, msg in [(dict(scale=float("nan")), "finite"), (dict(method="pag"), "unknown guidance 'pag'"),
                     (dict(apg_eta=float("inf")), "apg_eta must be finite"),
                     (dict(apg_norm_threshold=-1.0), "apg_norm_threshold")]:
        with pytest.raises(ValueError, match=msg):
            Guidance(**bad)


def test_callback_progress_bar_and_interrupt(pipe, capsys):
    seen = []

    def record(p, step, scale, kw):
        seen.append((step, scale, kw["clip"], tuple(kw["bits"].shape)))
        return kw

    schedule = pipe.pyramid.build(17)
    capsys.readouterr()
    out = pipe(PROMPT, num_frames=17, generator=g(0), output_type="uint8", callback_on_step_end=record)
    assert [s[0] for s in seen] == list(range(len(schedule.steps)))
    assert [(s[1], s[2]) for s in seen] == [(st.scale.index, st.scale.clip) for st in schedule.steps]
    assert seen[-1][3] == (1, *schedule.steps[-1].scale.shape, schedule.steps[-1].scale.bits)
    assert "generating" in capsys.readouterr().err                                  # a progress bar by default
    pipe.set_progress_bar_config(disable=True)
    try:
        pipe(PROMPT, num_frames=1, output_type="codes")
        assert capsys.readouterr().err == ""
    finally:
        pipe.set_progress_bar_config()

    def stop_after_3(p, step, scale, kw):
        if step == 2:
            p._interrupt = True
        return kw

    cut = pipe(PROMPT, num_frames=17, generator=g(0), output_type="uint8", callback_on_step_end=stop_after_3)
    assert len(cut.bits) == 3 and all(torch.equal(a, b) for a, b in zip(cut.bits, out.bits))
    assert cut.frames.shape == (1, 1, 64, 64, 3)          # the first clip (one frame) as far as it got
    assert pipe.interrupt
    pipe(PROMPT, num_frames=1, output_type="codes")
    assert not pipe.interrupt                               # reset by every call


def test_precision_dtype_and_to(pipe, monkeypatch):
    out = pipe(PROMPT, num_frames=1, output_type="codes", precision="fp32")
    assert out.precision == "fp32"
    import infinitystar.pipelines.infinitystar as module
    seen, sample, decode = [], module.generate, pipe.tokenizer.decode
    monkeypatch.setattr(module, "generate",
                        lambda *a, **k: seen.append(("generate", k["precision"])) or sample(*a, **k))
    monkeypatch.setattr(pipe.tokenizer, "decode",
                        lambda z, **k: seen.append(("decode", k["precision"])) or decode(z, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # bf16 on a CPU without native support warns (slow, still correct)
        assert pipe(PROMPT, num_frames=1, precision="bf16").precision == "bf16"
    assert seen == [("generate", torch.bfloat16), ("decode", torch.bfloat16)]     # the sampling and the decode
    with pytest.raises(UserError, match="precision 'fp16' is not supported"):
        pipe(PROMPT, num_frames=1, precision="fp16")
    with pytest.raises(UserError, match="precision 'half'"):
        InfinityStarPipeline(pipe.transformer, pipe.tokenizer, pipe.text_encoder, pipe.pyramid, 64, 64,
                             precision="half")
    tiny = InfinityStarPipeline.random_tiny(seed=1)
    assert tiny.to(torch.bfloat16).dtype == torch.bfloat16
    assert {p.dtype for p in tiny.text_encoder.parameters()} == {torch.bfloat16}
    assert tiny.to("cpu", torch.float32).dtype == torch.float32 and tiny.device.type == "cpu"
    assert tiny.to(device="cpu", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_conditioning_inputs(pipe):
    with pytest.warns(UserWarning, match="resized to the model's 64x64"):
        out = pipe("a red circle", num_frames=17, image=np.zeros((32, 48, 3), np.uint8), output_type="uint8")
    assert out.frames[0].shape == (17, 64, 64, 3)
    out = pipe(["a red circle"] * 2, num_frames=33, video=[np.zeros((17, 64, 64, 3), np.uint8)] * 2,
               output_type="uint8")
    assert len(out.frames) == 2 and out.frames[1].shape == (33, 64, 64, 3)
    # an output fed back in: float [0, 1] frames and PIL images are taken as the pixels they stand for
    first = pipe("a red circle", num_frames=1, generator=g(3))
    as_float = pipe("a red circle", num_frames=17, image=first.images[0], generator=g(4), output_type="codes")
    as_pil = pipe("a red circle", num_frames=17, image=Image.fromarray((first.images[0] * 255).round()
                                                                       .astype(np.uint8)),
                  generator=g(4), output_type="codes")
    assert torch.equal(as_float.codes, as_pil.codes)
    assert torch.equal(pipe("a red circle", num_frames=5, image=first.images[0], num_videos_per_prompt=2,
                            output_type="codes").bits[0][0], as_float.bits[0][0])
    with pytest.raises(ValueError, match="continuation needs at least 17 frames"):
        pipe("a red circle", num_frames=33, video=np.zeros((9, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="nothing left to generate"):
        pipe("a red circle", num_frames=17, video=np.zeros((17, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="empty prompt"):
        pipe("", num_frames=1)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        pipe("a red circle", num_frames=16)


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "model")
    again = InfinityStarPipeline.from_pretrained(tmp_path / "model", precision="fp32")
    run = lambda p: p("a red circle", num_frames=5, generator=g(3), output_type="uint8").frames[0]
    assert np.array_equal(run(pipe), run(again))
    assert again.defaults == pipe.defaults
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        InfinityStarPipeline.from_pretrained(tmp_path)


def test_generate_command(tmp_path, capsys, pipe):
    out = tmp_path / "v.mp4"
    assert cli_main(["generate", "--prompt", "a red circle moving left slowly on a gray background",
                     "--out", str(out), "--frames", "9", "--json", "--seed", "4", "--precision", "fp32"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["frames"] == 9 and summary["seed"] == 4 and summary["output"] == str(out)
    assert summary["fps"] == 16 and summary["precision"] == "fp32"
    assert load_video(out).shape == (9, 64, 64, 3)
    png = tmp_path / "i.png"
    assert cli_main(["generate", "--prompt", "a red circle", "--out", str(png)]) == 0 and png.is_file()
    gif = tmp_path / "v.gif"
    assert cli_main(["generate", "--prompt", "a red circle moving up slowly on a gray background", "--out",
                     str(gif), "--frames", "5", "--fps", "8", "--negative-prompt", "a blue square"]) == 0
    assert Image.open(gif).n_frames == 5 and Image.open(gif).info["duration"] == 120   # 1/8 s in 1/100 s
    capsys.readouterr()
    for argv, msg in [(["--out", str(tmp_path / "missing" / "v.mp4")], "folder .* does not exist"),
                      (["--prompt", " ", "--out", str(out)], "non-empty --prompt"),
                      (["--out", str(tmp_path / "v.avi")], "output must end in .mp4, .gif, .npy"),
                      (["--out", str(tmp_path)], "is a folder"),
                      (["--out", str(out), "--fps", "-3"], "--fps: '-3' is not a positive number"),
                      (["--out", str(out), "--device", "bogus"], "unknown device 'bogus'; available here: cpu"),
                      (["--out", str(out), "--model", str(tmp_path / "nowhere")], "no such folder|not an "),
                      (["--out", str(png), "--frames", "5"], "is an image")]:
        argv = argv if "--prompt" in argv else ["--prompt", "a red circle", *argv]
        assert cli_main(["generate", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ")
        assert re.search(msg, err), (msg, err)
    if not torch.cuda.is_available():
        assert cli_main(["generate", "--prompt", "x", "--out", str(out), "--device", "cuda"]) == 2
        assert "this torch has no CUDA device; available here: cpu" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*"))            # no temporary files left behind


def test_tokenizer_with_pixel_repeat_generates_at_the_frame_size(tmp_path):
    """A tokenizer with pixel_repeat 2 gives 16x16 latents for 64x64 frames: every task still returns 64x64 frames,
    the given frame comes back through the pipeline's encoder, and a saved folder loads with it."""
    from infinitystar.schedules.pyramid import PyramidConfig
    from infinitystar.tokenizer.video_vae import VideoVAE, VideoVAEConfig
    tiny = InfinityStarPipeline.random_tiny(seed=0)
    vae = VideoVAE(VideoVAEConfig.from_dict({**VideoVAEConfig.small().to_dict(), "pixel_repeat": 2})).eval()
    vae.load_state_dict(tiny.tokenizer.state_dict())
    pyramid = PyramidConfig(pn=None, custom_scales=[[1, 1], [2, 2], [4, 4], [8, 8], [16, 16]], frames_per_clip=4,
                            temporal_compression=vae.config.temporal_stride, detail_min_tokens=36)
    pipe = InfinityStarPipeline(tiny.transformer, vae, tiny.text_encoder, pyramid, 64, 64)
    pipe.precision = "fp32"
    out = pipe(PROMPT, num_frames=5, generator=g(0), output_type="codes")
    assert out.codes.shape[-2:] == (16, 16)
    video = pipe(PROMPT, num_frames=5, image=np.zeros((64, 64, 3), np.uint8), generator=g(0), output_type="uint8")
    assert video.frames[0].shape == (5, 64, 64, 3)
    pipe.save_pretrained(tmp_path / "x2")
    again = InfinityStarPipeline.from_pretrained(tmp_path / "x2", precision="fp32")
    assert again.tokenizer.config.pixel_repeat == 2
    assert np.array_equal(again(PROMPT, num_frames=1, generator=g(1), output_type="uint8").images[0],
                          pipe(PROMPT, num_frames=1, generator=g(1), output_type="uint8").images[0])
