"""Memory options: each gives the plain path's numbers (token chunks and offloads up to float rounding, VAE tiles
within a stated tolerance), and the mechanics (placement, hooks, in-place inference paths) do what they say."""
import argparse
import json

import numpy as np
import pytest
import torch

from infinitystar.schedules.pyramid import pyramid_preset
from infinitystar.memory import (MemoryOptions, SequentialOffload, add_memory_flags, home_devices,
                                 memory_from_args)
from infinitystar import pipelines
from infinitystar.cli import main as cli_main
from infinitystar.model.infinitystar import InfinityStarTransformer, transformer_preset
from infinitystar.pipelines import InfinityPipeline
from infinitystar.pipelines.infinitystar import DEFAULT_MODEL_DIR, InfinityStarPipeline
from infinitystar.sampling.generate import Caption, generate
from infinitystar.sampling.guidance import Guidance
from infinitystar.tokenizer.video_vae import VideoVAE, tile_starts

PLAIN = MemoryOptions(text_encoder="device", token_chunk=None, vae_chunk=2)     # no option: the official decode


def _tiny_generation(token_chunk):
    torch.manual_seed(0)
    model = InfinityStarTransformer(transformer_preset("tiny")).eval()
    model.set_token_chunk(token_chunk)
    cap = Caption(torch.randn(2, 5, 32))
    return generate(model, pyramid_preset("tiny").build(17), cap, guidance=Guidance(3.0),
                    generator=torch.Generator().manual_seed(0), record_logits=True)


@pytest.mark.parametrize("chunk", [7, 16, 40])
def test_token_chunks_give_the_one_pass_numbers(chunk):
    ref, out = _tiny_generation(None), _tiny_generation(chunk)
    assert all(torch.equal(a, b) for a, b in zip(ref.bits, out.bits))
    worst = max((a["guided"] - b["guided"]).abs().max().item() for a, b in zip(ref.logits, out.logits))
    assert worst <= 1e-5          # float rounding of the row-chunked matmuls only
    assert torch.equal(ref.codes, out.codes)


def test_token_chunk_is_validated():
    model = InfinityStarTransformer(transformer_preset("tiny"))
    with pytest.raises(ValueError, match="token_chunk"):
        model.set_token_chunk(0)
    with pytest.raises(ValueError, match="token_chunk"):
        MemoryOptions(token_chunk=-1)
    with pytest.raises(ValueError, match="text_encoder"):
        MemoryOptions(text_encoder="gpu")
    with pytest.raises(ValueError, match="vae_tile"):
        MemoryOptions(vae_tile=4, vae_tile_overlap=4)
    with pytest.raises(ValueError, match="vae_chunk"):
        MemoryOptions(vae_chunk=0)


@pytest.mark.parametrize("options", [
    MemoryOptions(),
    MemoryOptions(text_encoder="cpu", token_chunk=9, sequential_offload=True),
])
def test_pipeline_options_give_the_plain_frames(options):
    frames = []
    for opts in (PLAIN, options):
        pipe = InfinityStarPipeline.random_tiny(seed=0)
        pipe.memory = opts
        pipe.to("cpu")
        out = pipe("a large red circle moving right", num_frames=9, generator=torch.Generator().manual_seed(1))
        frames.append((out.codes, out.frames[0]))
    assert torch.allclose(frames[0][0], frames[1][0], atol=1e-6)
    assert np.array_equal(frames[0][1], frames[1][1])


def test_vae_chunks_and_offload_for_decode_give_the_plain_frames():
    """17 frames (5 latent frames): VAE decoder chunks of 1 and 3 latent frames give the plain decode's frames up to
    float rounding, the codes identically; offload_for_decode too (on the CPU host and device are one, so it moves
    nothing: its moves are checked in tests/test_plan.py on the simulated device)."""
    outs = []
    for opts in (PLAIN, MemoryOptions(vae_chunk=1, offload_for_decode=True), MemoryOptions(vae_chunk=3)):
        pipe = InfinityStarPipeline.random_tiny(seed=0)
        pipe.memory = opts
        pipe.to("cpu")
        outs.append(pipe("a large red circle moving right", num_frames=17, output_type="pt",
                         generator=torch.Generator().manual_seed(1)))
    ref = outs[0]
    assert ref.frames.shape == (1, 17, 3, 64, 64)
    for out in outs[1:]:
        assert torch.equal(out.codes, ref.codes)
        assert (out.frames - ref.frames).abs().max().item() <= 1e-6


def test_from_pretrained_places_the_parts_as_the_options_say(tmp_path):
    InfinityStarPipeline.random_tiny(seed=0).save_pretrained(tmp_path / "star")
    plain = InfinityStarPipeline.from_pretrained(tmp_path / "star", memory=PLAIN)
    offload = pipelines.load(tmp_path / "star", memory=MemoryOptions(token_chunk=9, sequential_offload=True))
    assert plain._offload is None and offload._offload is not None and offload.memory.token_chunk == 9
    run = lambda p: p("a large red circle moving right", num_frames=5, generator=torch.Generator().manual_seed(1),
                      output_type="uint8").frames
    assert np.array_equal(run(plain), run(offload))
    offload.to(torch.bfloat16)                 # a dtype change puts the blocks back behind fresh hooks
    assert offload._offload is not None and offload.dtype == torch.bfloat16
    assert {p.dtype for p in offload.transformer.blocks.parameters()} == {torch.bfloat16}
    InfinityPipeline.random_tiny(seed=0).save_pretrained(tmp_path / "image")
    with pytest.raises(ValueError, match="sequential offload is available for InfinityStar"):
        pipelines.load(tmp_path / "image", memory=MemoryOptions(sequential_offload=True))


class _Probe(torch.nn.Linear):
    """Records where its weight is while it runs."""
    seen: list

    def forward(self, x):
        self.seen.append(self.weight.device.type)
        return super().forward(x)


def test_sequential_offload_moves_each_module_only_for_its_forward():
    # the meta device stands in for the accelerator: the copy made for the forward is visibly elsewhere
    block = _Probe(4, 3)
    block.seen = []
    host_ptr = block.weight.data_ptr()
    off = SequentialOffload([block], device="meta", host="cpu")
    y = block(torch.ones(2, 4, device="meta"))
    assert block.seen == ["meta"] and y.device.type == "meta"
    assert block.weight.device.type == "cpu" and block.weight.data_ptr() == host_ptr   # the host copy again
    off.remove()
    block(torch.ones(2, 4))
    assert block.seen == ["meta", "cpu"]


def test_home_devices_follow_the_options():
    h = home_devices("cuda", MemoryOptions(text_encoder="offload", sequential_offload=True))
    assert (h["transformer"].type, h["text_encoder"].type, h["tokenizer"].type) == ("cpu", "cpu", "cuda")
    h = home_devices("cuda", MemoryOptions(text_encoder="device"))
    assert (h["transformer"].type, h["text_encoder"].type) == ("cuda", "cuda")


def test_memory_flags_round_trip():
    p = argparse.ArgumentParser()
    add_memory_flags(p)
    assert memory_from_args(p.parse_args([])) == MemoryOptions()
    got = memory_from_args(p.parse_args(["--text-encoder", "cpu", "--token-chunk", "0", "--vae-tile", "32",
                                         "--vae-tile-overlap", "6", "--sequential-offload", "--vae-chunk", "1",
                                         "--offload-for-decode"]))
    assert got == MemoryOptions(text_encoder="cpu", token_chunk=None, vae_tile=32, vae_tile_overlap=6,
                                sequential_offload=True, vae_chunk=1, offload_for_decode=True)


# --- VAE decode: spatial tiles ------------------------------------------------------------------------------------
def test_tile_starts_cover_the_axis():
    assert tile_starts(8, 10, 4) == [0]
    assert tile_starts(16, 10, 4) == [0, 6]
    assert tile_starts(45, 32, 4) == [0, 13]
    for size, tile, overlap in [(80, 32, 4), (53, 24, 8), (17, 5, 1)]:
        starts = tile_starts(size, tile, overlap)
        covered = np.zeros(size, bool)
        for s in starts:
            covered[s:s + tile] = True
        assert covered.all() and starts[-1] + tile == size
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


@pytest.fixture(scope="module")
def shipped_vae_and_latent():
    """The shipped tokenizer (trained) and the latent of a 128x128 frame of four Shapes World images."""
    from infinitystar.shapes.world import BACKGROUND_NAMES, COLORS, SHAPES, SIZE_NAMES, ShapeSpec, render
    vae = VideoVAE.from_pretrained(DEFAULT_MODEL_DIR / "tokenizer")
    parts = [render(ShapeSpec(COLORS[i], SHAPES[i % len(SHAPES)], SIZE_NAMES[-1],
                              BACKGROUND_NAMES[i % len(BACKGROUND_NAMES)], 32.0, 32.0), 1) for i in range(4)]
    img = np.concatenate([np.concatenate(parts[:2], 2), np.concatenate(parts[2:], 2)], 1)
    video = torch.from_numpy(img).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]
    with torch.no_grad():
        z = vae.encode(video)
        ref = vae.decode(z)
    assert z.shape[-1] == z.shape[-2] >= 16     # 16 x 16 at 8x compression (32 x 32 with pixel_repeat 2)
    return vae, z, ref


def test_vae_tiles_match_the_plain_decode_within_tolerance(shipped_vae_and_latent):
    vae, z, ref = shipped_vae_and_latent
    side = z.shape[-1]
    with torch.no_grad():       # 2 x 2 tiles: 20 x 20 latent cells, overlap 10, on the shipped 32 x 32 latent
        out = vae.decode(z, tile=side * 5 // 8, tile_overlap=side * 5 // 16)
    diff = (out - ref).abs()
    assert out.shape == ref.shape
    # the stated tolerance (docs/gpu.md): seams only; measured max 0.024, mean 7e-5 on a [-1, 1] scale
    assert diff.max().item() <= 0.03
    assert diff.mean().item() <= 1e-3


def test_vae_tile_larger_than_the_latent_is_the_plain_decode(shipped_vae_and_latent):
    vae, z, ref = shipped_vae_and_latent
    with torch.no_grad():
        assert torch.equal(vae.decode(z, tile=z.shape[-1]), ref)
    with pytest.raises(ValueError, match="tile"):
        vae.decode(z, tile=4, tile_overlap=4)


@pytest.mark.parametrize("frames", [1, 2, 5, 6])      # odd and even latent counts, one chunk and several
def test_inference_decode_in_place_equals_the_autograd_path(shipped_vae_and_latent, frames):
    """The no-grad decoder (in-place norms and SiLU, the upsampler writing its shortcut straight into the output)
    gives the autograd path's values bit for bit, on the shipped tokenizer and on the released layout."""
    from infinitystar.tokenizer.video_vae import VideoVAEConfig
    torch.manual_seed(frames)
    for vae in (shipped_vae_and_latent[0], VideoVAE(VideoVAEConfig.tiny()).eval()):
        z = torch.randn(1, vae.config.codebook_dim, frames, 4, 6)
        for chunked, chunk in ((True, 2), (True, 1), (False, 2)):
            with torch.no_grad():
                fast = vae.decode(z, chunked=chunked, chunk=chunk)
            assert torch.equal(fast, vae.decode(z, chunked=chunked, chunk=chunk).detach())


# --- weights in bf16 ----------------------------------------------------------------------------------------------
def test_bf16_weights_track_the_fp32_path():
    """The shipped transformer loaded straight into bf16, teacher-forced on the fp32 run's bits: its logits stay
    within 4 % of the step's largest logit (measured <= 2.5 %: bf16 keeps 8 bits of mantissa) and pick the same
    likely value for >= 99 % of the bits (measured >= 99.6 %)."""
    pipe = InfinityStarPipeline.from_pretrained()
    fp32 = pipe.transformer
    bf16 = InfinityStarTransformer.from_pretrained(DEFAULT_MODEL_DIR / "transformer", torch_dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    feats, mask = pipe.text_encoder.encode(["a large red circle moving right quickly on a black background"])
    cap, schedule = Caption(feats, mask), pipe.pyramid.build(17)
    ref = generate(fp32, schedule, cap, guidance=Guidance(3.0), generator=torch.Generator().manual_seed(0),
                   record_logits=True)
    out = generate(bf16, schedule, cap, guidance=Guidance(3.0), generator=torch.Generator().manual_seed(0),
                   record_logits=True, prefix_bits=ref.bits)
    assert len(out.logits) == len(ref.logits) == len(schedule.steps)
    for a, b in zip(ref.logits, out.logits):
        scale = a["cond"].float().abs().max().item()
        assert (a["cond"].float() - b["cond"].float()).abs().max().item() <= 0.04 * scale
        same = (a["cond"][..., 1] > a["cond"][..., 0]) == (b["cond"][..., 1] > b["cond"][..., 0])
        assert same.float().mean().item() >= 0.99


def test_weights_load_straight_into_the_dtype_of_each_component(tmp_path, capsys):
    """`from_pretrained(torch_dtype={...})` (diffusers' per-component form) and `generate --dtype bf16`: the
    transformer is read into bf16, the VAE stays float32; unknown components are named."""
    pipe = pipelines.load(DEFAULT_MODEL_DIR, torch_dtype={"transformer": torch.bfloat16})
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pipe.tokenizer.parameters()} == {torch.float32}
    every = pipelines.load(DEFAULT_MODEL_DIR, torch_dtype={"default": torch.bfloat16, "tokenizer": torch.float32})
    assert every.dtype == torch.bfloat16 and {p.dtype for p in every.tokenizer.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="unknown component.*vae"):
        pipelines.load(DEFAULT_MODEL_DIR, torch_dtype={"vae": torch.bfloat16})
    out = tmp_path / "i.png"
    assert cli_main(["generate", "--prompt", "a red circle", "--out", str(out), "--dtype", "bf16", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["dtype"] == "bf16" and out.is_file()
