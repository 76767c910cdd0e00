"""Clip-by-clip streaming (`pipe.start` / `extend` / `video`) and `infinitystar generate --interactive`, on tiny
random-weight pipelines (every code path; no quality claims). Most tests swap the video VAE for a cheap causal
stand-in (the VAE's decode dominates their time on a CPU); the VAE's own streaming decode and the command run the
real one."""
import io
import json

import numpy as np
import pytest
import torch

from infinitystar.cli import main as cli_main
from infinitystar.cli.interactive import run as run_interactive
from infinitystar.media import load_video
from infinitystar.pipelines.infinitystar import InfinityStarPipeline
from infinitystar.quant.interact import InteractConfig
from infinitystar.runtime import UserError

PROMPTS = ["a red circle moving right slowly on a black background",
           "a red circle moving up slowly on a black background",
           "a blue square moving left quickly on a white background"]


def g(seed=3):
    return torch.Generator().manual_seed(seed)


class FrameTokenizer:
    """A causal stand-in for the video VAE (8x space, 4x time): latent frame 0 -> 1 frame, every later latent frame
    -> 4 frames, each frame from its latent alone; encode keeps frames 0, 1, 5, 9, ... pooled to 8x8."""

    def decode(self, z, first=True, precision=torch.float32, chunk=2):       # every chunking gives the same
        x = torch.tanh(z[:, :3]).repeat_interleave(8, 3).repeat_interleave(8, 4)
        if not first:
            return x.repeat_interleave(4, dim=2)
        return torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)

    def encode(self, video):
        x = torch.nn.functional.avg_pool3d(video[:, :, ::4], (1, 8, 8))
        return x.repeat(1, 22, 1, 1, 1)[:, :64]

    def decode_stream(self, chunk=2):
        tok, started = self, []

        class Stream:
            def decode(self, z, precision=torch.float32):
                out = tok.decode(z, first=not started)
                started.append(True)
                return out
        return Stream()

    def save_pretrained(self, directory):
        raise NotImplementedError("a test double")


def _fast(pipe):
    pipe.tokenizer = FrameTokenizer()
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return _fast(InfinityStarPipeline.random_tiny(seed=0))


@pytest.fixture(scope="module")
def real_pipe():
    return InfinityStarPipeline.random_tiny(seed=0)


@pytest.fixture(scope="module")
def interact_pipe():
    return _fast(InfinityStarPipeline.random_tiny(seed=1, interact=InteractConfig(semantic_scale=2)))


def test_stream_equals_batch_video_and_keeps_only_the_last_scale(pipe):
    stream = pipe.start(PROMPTS[0], generator=g())
    assert stream.clips[0].shape == (17, 64, 64, 3)
    sizes = []
    for p in PROMPTS[1:]:
        clip = stream.extend(p)
        assert clip.shape == (16, 64, 64, 3) and clip is stream.clips[-1]
        # what lives between calls: the current caption and the last scale of the last clip, nothing more
        m, n = len(stream.clips), len(pipe.pyramid.spatial_scales())      # clip m of the schedule was just made
        assert stream.state.cache.keys() == [("text", m - 1), (m + 1) * n - 1]
        sizes.append(stream.state.cache.nbytes())
    assert sizes[0] == sizes[1]
    batch = pipe([PROMPTS], num_frames=49, generator=g(), output_type="uint8")
    assert stream.video().shape == (49, 64, 64, 3) and stream.num_frames == 49
    assert np.array_equal(stream.video(), batch.frames[0])
    assert stream.prompts == PROMPTS and len(stream.timings) == 3


def test_stream_from_a_first_frame_or_a_video(pipe):
    frame = np.full((64, 64, 3), 200, np.uint8)
    stream = pipe.start(PROMPTS[0], image=frame, generator=g())
    assert np.array_equal(stream.clips[0], pipe(PROMPTS[0], num_frames=17, image=frame, generator=g(),
                                                output_type="uint8").frames[0])
    start = (np.arange(17 * 64 * 64 * 3) % 251).astype(np.uint8).reshape(17, 64, 64, 3)
    stream = pipe.start(PROMPTS[0], video=start, generator=g())
    assert stream.clips[0].shape == (17, 64, 64, 3)            # the given video, through the tokenizer
    stream.extend(PROMPTS[1])
    batch = pipe([PROMPTS[:2]], num_frames=33, video=start, generator=g(), output_type="uint8")
    assert np.array_equal(stream.video(), batch.frames[0])


def test_stream_errors_leave_the_stream_usable(pipe):
    with pytest.raises(UserError, match="empty prompt"):
        pipe.start("  ")
    with pytest.raises(UserError, match="no interactive mode"):
        pipe.start(PROMPTS[0], inference="interact")
    with pytest.raises(UserError, match="either image .* or video"):
        pipe.start(PROMPTS[0], image=np.zeros((64, 64, 3), np.uint8), video=np.zeros((17, 64, 64, 3), np.uint8))
    stream = pipe.start(PROMPTS[0], generator=g())
    with pytest.raises(UserError, match="empty prompt"):
        stream.extend("")
    assert len(stream.clips) == 1
    assert stream.extend(PROMPTS[1]).shape == (16, 64, 64, 3)


def test_interact_stream_segments(interact_pipe, tmp_path):
    pipe = interact_pipe
    assert pipe.inference == "interact"
    stream = pipe.start(PROMPTS[0], generator=g())
    assert stream.clips[0].shape == (17, 64, 64, 3) and stream.previous.shape == (1, 64, 5, 8, 8)
    first = stream.first.clone()
    previous = stream.previous.clone()
    clip = stream.extend(PROMPTS[1])
    assert clip.shape == (16, 64, 64, 3)
    assert torch.equal(stream.first, first)                                   # fixed for the session
    assert torch.equal(stream.previous[:, :, :1], previous[:, :, -1:])        # P <- last 1 + T of [P[1:], new]
    assert torch.equal(stream.previous[:, :, 1:], stream.last_codes)
    stream.extend(PROMPTS[2])
    whole = pipe([PROMPTS], num_frames=49, generator=g(), output_type="uint8")   # the batch path streams too
    assert np.array_equal(stream.video(), whole.frames[0]) and whole.codes.shape == (1, 64, 13, 8, 8)
    # the "clips" path of the same weights differs from the interactive segments
    other = pipe.start(PROMPTS[0], inference="clips", generator=g())
    assert np.array_equal(other.clips[0], stream.clips[0])
    assert not np.array_equal(other.extend(PROMPTS[1]), stream.clips[1])
    # the official start: the last 1 + 4T frames of a given video, encoded (continuous latents)
    start = (np.arange(21 * 64 * 64 * 3) % 251).astype(np.uint8).reshape(21, 64, 64, 3)
    from_video = pipe.start(PROMPTS[0], video=start, generator=g())
    assert from_video.clips[0].shape == (17, 64, 64, 3)
    with pytest.raises(UserError, match="at least 17 frames"):
        pipe.start(PROMPTS[0], video=start[:9])
    # the model folder says which path it needs
    pipe = InfinityStarPipeline.random_tiny(seed=1, interact=InteractConfig(semantic_scale=2))
    pipe.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert meta["inference"] == "interact" and meta["interact"]["semantic_scale"] == 2
    again = InfinityStarPipeline.from_pretrained(tmp_path / "m")
    assert again.interact == pipe.interact
    meta["inference"] = "clips"
    (tmp_path / "m" / "model_index.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match='"interact" settings need "inference": "interact"'):
        InfinityStarPipeline.from_pretrained(tmp_path / "m")
    meta["inference"] = "magic"
    (tmp_path / "m" / "model_index.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown inference 'magic'"):
        InfinityStarPipeline.from_pretrained(tmp_path / "m")


def test_decode_stream_equals_one_decode(real_pipe):
    vae = real_pipe.tokenizer
    z = torch.randn(1, 64, 7, 8, 8, generator=g(5))
    stream = vae.decode_stream()
    with torch.no_grad():
        pieces = [stream.decode(z[:, :, :1]), stream.decode(z[:, :, 1:5]), stream.decode(z[:, :, 5:])]
        assert [p.shape[2] for p in pieces] == [1, 16, 8]
        assert torch.equal(torch.cat(pieces, dim=2), vae.decode(z))
        with pytest.raises(ValueError, match="multiple of 2 latent frames"):
            stream.decode(z[:, :, :3])


def test_interactive_writes_every_clip_and_the_whole_video(real_pipe, tmp_path, capsys):
    pipe = real_pipe
    out = tmp_path / "v.mp4"
    assert run_interactive(pipe, out, seed=0, guidance_scale=None, temperature=None, inference=None, image=None,
                           video=None, as_json=True, stdin=io.StringIO("\n".join(PROMPTS) + "\n")) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [l["frames"] for l in lines] == [17, 33, 49] and [l["clip_frames"] for l in lines] == [17, 16, 16]
    assert load_video(out).shape == (49, 64, 64, 3)
    assert [load_video(tmp_path / f"v_clip{k:03d}.mp4").shape[0] for k in (1, 2, 3)] == [17, 16, 16]
    # an empty line stops with a clear error; what was written stays
    out2 = tmp_path / "w.mp4"
    with pytest.raises(UserError, match="line 2 of the input is empty.*1 clip\\(s\\) written so far are kept"):
        run_interactive(pipe, out2, seed=0, guidance_scale=None, temperature=None, inference=None, image=None,
                        video=None, as_json=False, stdin=io.StringIO(PROMPTS[0] + "\n\n" + PROMPTS[1] + "\n"))
    assert load_video(out2).shape[0] == 17 and (tmp_path / "w_clip001.mp4").is_file()
    assert not (tmp_path / "w_clip002.mp4").exists()


def test_interactive_command_errors(real_pipe, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "m"
    real_pipe.save_pretrained(folder)
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPTS[0] + "\n"))
    assert cli_main(["generate", "--interactive", "--model", str(folder), "--out", str(tmp_path / "x.mp4"),
                     "--inference", "interact"]) == 2
    assert "no interactive mode" in capsys.readouterr().err
    assert cli_main(["generate", "--interactive", "--prompt", "a", "--out", str(tmp_path / "x.mp4")]) == 2
    assert "cannot be used with --interactive" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()
