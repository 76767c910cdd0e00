"""Interactive long video (InfinityStar-Interact): the official fixture, condition blocks, their positions and
attention pattern, and the segment loop's latent bookkeeping."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from infinitystar.cli import main as cli_main
from infinitystar.convert.cli import load_converted
from infinitystar.convert.official import load_official_transformer
from infinitystar.model.infinitystar import InfinityStarTransformer, TransformerConfig
from infinitystar.model.packing import PackSample, pack_sequence, select_steps
from infinitystar.model.rope import condition_positions
from infinitystar.parity import run_checks
from infinitystar.pipelines.infinitystar import GenerationDefaults, InfinityStarPipeline
from infinitystar.quant.interact import InteractConfig, condition_maps, decode_window, next_previous, segment_schedule
from infinitystar.quant.residual import encode_targets
from infinitystar.sampling.generate import Caption, generate
from infinitystar.schedules.pyramid import PyramidConfig

TINY = TransformerConfig(width=64, depth=2, num_heads=4, num_kv_heads=2, text_channels=16, text_maxlen=16,
                         null_text_len=32)
PYRAMID = PyramidConfig(pn=None, custom_scales=[[1, 1], [2, 3], [3, 5], [6, 10]], frames_per_clip=3,
                        image_repetition=[2, 1, 1, 1], video_repetition=[2, 2, 1, 1], detail_min_tokens=15)
INTERACT = InteractConfig(semantic_scale=2, detail_frames=2)


def _model(seed=0):
    torch.manual_seed(seed)
    m = InfinityStarTransformer(TINY).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _latents(seed, frames, hw=(6, 10)):
    return torch.randn(1, 64, frames, *hw, generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
def test_official_interact_fixture_passes(fixtures_dir):
    records = list(run_checks(fixtures_dir / "infinitystar" / "interact"))
    bad = [r for r in records if not r.ok]
    assert len(records) > 40 and not bad, bad[:5]
    names = {r.tensor for r in records}
    assert {"cond/semantic/positions", "cond/detail/tokens", "greedy/new_clip_codes",
            "teacher_forced/step013/logits_uncond"} <= names
    assert max(r.max_abs_err for r in records if r.tol > 0) < 1e-5


def test_segment_schedule_blocks_and_positions():
    s = segment_schedule(PYRAMID, INTERACT)
    assert s.num_clips == 1 and s.clips == [(0, 3)]
    assert [x.shape for x in s.scales] == [(3, 1, 1), (3, 2, 3), (3, 3, 5), (3, 6, 10)]
    assert [x.repetitions for x in s.scales] == [2, 2, 1, 1] and s.steps[0].index == 0
    assert [x.bits for x in s.scales] == [16, 16, 64, 64]
    sem, det = s.conditions
    assert (sem.name, sem.shape, sem.frames, sem.position) == ("semantic", (3, 3, 5), (1, 2, 3), 800)
    assert (det.name, det.shape, det.frames, det.position) == ("detail", (3, 6, 10), (0, 2, 3), 801)
    pos = condition_positions(sem, s.full_hw, TINY.text_maxlen).view(3, 3, 5, 4)
    assert pos[..., 0].unique().tolist() == [16 + 800]
    assert pos[:, 0, 0, 1].tolist() == [1, 2, 3]
    assert pos[0, :, 0, 2].tolist() == [0, 2, 4]                  # round(i * 6 / 3)
    assert pos[0, 0, :, 3].tolist() == [0, 2, 4, 6, 8]
    # rows of a 4-row block on 6 rows: 1.5 -> 2 and 4.5 -> 4 (round half to even)
    odd = segment_schedule(PyramidConfig(**{**PYRAMID.to_dict(), "custom_scales": [[1, 1], [4, 4], [6, 10]],
                                            "image_repetition": [1] * 3, "video_repetition": [1] * 3}),
                           InteractConfig(semantic_scale=1))
    rows = condition_positions(odd.conditions[0], odd.full_hw, 0).view(3, 4, 4, 4)[0, :, 0, 2]
    assert rows.tolist() == [0, 2, 3, 4]
    with pytest.raises(ValueError, match="semantic_scale 4 is not a scale"):
        segment_schedule(PYRAMID, InteractConfig(semantic_scale=4))
    with pytest.raises(ValueError, match="detail_frames 4 exceeds"):
        segment_schedule(PYRAMID, InteractConfig(semantic_scale=1, detail_frames=4))


def test_condition_maps_and_segment_bookkeeping():
    s = segment_schedule(PYRAMID, INTERACT)
    prev, first = _latents(1, 4), _latents(2, 1)
    maps = condition_maps(prev, first, s)
    # semantic: P[1:] (frame 0 dropped) area-pooled to 3x5; each output cell averages its adaptive window
    assert maps["semantic"].shape == (1, 64, 3, 3, 5)
    assert torch.allclose(maps["semantic"][:, :, :, 0, 0], prev[:, :, 1:, 0:2, 0:2].mean((-1, -2)), atol=1e-6)
    assert torch.equal(maps["detail"], torch.cat([first, prev[:, :, 2:4]], dim=2))
    new = _latents(3, 3)
    assert torch.equal(decode_window(prev, new), torch.cat([prev[:, :, 1:], new], dim=2))
    assert torch.equal(next_previous(prev, new), torch.cat([prev[:, :, 3:], new], dim=2))
    with pytest.raises(ValueError, match=r"previous segment latents must be \(B, C, 4, 6, 10\)"):
        condition_maps(prev[:, :, 1:], first, s)
    noisy = condition_maps(prev, first, s, noise={"semantic": 0.3, "detail": 0.3},
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy["detail"][:, :, :1], first)          # the session's first latent stays clean
    diff = (noisy["semantic"] - maps["semantic"]).std() / maps["semantic"].std()
    assert 0.2 < diff < 0.4


def test_attention_pattern_of_condition_blocks():
    s = segment_schedule(PYRAMID, INTERACT)
    steps = select_steps(s, repetition="last")
    packed = pack_sequence([PackSample(s, steps, [5])], TINY.text_maxlen, pad_multiple=1)
    n_vis, table = len(steps), packed.segment_table
    sem, det, text, pad = n_vis, n_vis + 1, n_vis + 2, n_vis + 3
    for i in range(n_vis):   # own scale, caption, both conditions; no earlier scale of the segment
        assert table[i].nonzero().flatten().tolist() == [i, sem, det, text]
    for j in (sem, det, text):
        assert table[j].nonzero().flatten().tolist() == [j]
    assert not table[pad].any()


def test_kv_cached_segment_equals_packed_forward_and_conditions_matter():
    """The KV-cached segment (condition passes cached, every step reading caption + conditions) gives the logits
    of one packed forward with the condition segments; different conditions change them."""
    model = _model()
    s = segment_schedule(PYRAMID, INTERACT)
    maps = condition_maps(_latents(1, 4), _latents(2, 1), s)
    targets = encode_targets(_latents(4, 3), s)
    text = torch.randn(5, 16, generator=torch.Generator().manual_seed(5))
    out = generate(model, s, Caption(text[None]), conditions=maps, prefix_bits=targets.bits, record_logits=True)
    assert torch.equal(out.codes, targets.codes)
    steps = select_steps(s, repetition="last")
    packed = pack_sequence([PackSample(s, steps, [5])], TINY.text_maxlen, pad_multiple=32)
    x = torch.cat([targets.inputs[st.index][0] for st in steps])
    cond_tokens = [maps[b.name][0].flatten(1).T for _, b in packed.condition_segments]
    logits = model.forward_packed(x, [text], packed, conditions=cond_tokens)
    for st, lg in zip(steps, logits):
        assert torch.allclose(lg, out.logits[st.index]["cond"][0], atol=2e-5), st
    other = condition_maps(_latents(7, 4), _latents(2, 1), s)
    again = generate(model, s, Caption(text[None]), conditions=other, prefix_bits=targets.bits, record_logits=True)
    assert not torch.allclose(again.logits[0]["cond"], out.logits[0]["cond"], atol=1e-4)
    with pytest.raises(ValueError, match="condition maps"):
        generate(model, s, Caption(text[None]), conditions={"semantic": maps["semantic"]})
    with pytest.raises(ValueError, match="condition 'detail' has shape"):
        generate(model, s, Caption(text[None]), conditions={**maps, "detail": maps["detail"][:, :, :2]})


def test_interact_checkpoint_converts_strictly_into_an_interact_model_folder(fixtures_dir, tmp_path, capsys):
    src = fixtures_dir / "infinitystar" / "interact" / "weights.safetensors"
    assert cli_main(["convert", str(src), str(tmp_path / "transformer"), "--text-maxlen", "64"]) == 0
    model = load_converted(tmp_path / "transformer")
    direct = load_official_transformer(str(src), text_maxlen=64)
    assert model.config == direct.config and model.config.text_maxlen == 64
    assert all(torch.equal(v, direct.state_dict()[k]) for k, v in model.state_dict().items())
    broken = load_file(str(src))
    del broken["block_chunks.1.module.1.mlp.up_proj.weight"]
    save_file(broken, str(tmp_path / "broken.safetensors"))
    assert cli_main(["convert", str(tmp_path / "broken.safetensors"), str(tmp_path / "t2"), "--text-maxlen", "64"]) == 2
    assert re.search("missing keys: blocks.3.mlp.up_proj.weight", capsys.readouterr().err)
    # a model folder around it says it needs the interactive path and gets the official script's defaults
    pipe = InfinityStarPipeline.random_tiny(interact=InteractConfig(semantic_scale=2))
    pipe.transformer = model
    pipe.save_pretrained(tmp_path / "model")
    meta = json.loads((tmp_path / "model" / "model_index.json").read_text())
    del meta["defaults"]
    (tmp_path / "model" / "model_index.json").write_text(json.dumps(meta))
    again = InfinityStarPipeline.from_pretrained(tmp_path / "model")
    assert again.inference == "interact" and again.interact == InteractConfig(semantic_scale=2)
    assert again.defaults == GenerationDefaults.interact()
    assert (again.defaults.guidance, again.defaults.guidance_scale, again.defaults.tau_video) == ("cfg", 3.0, 0.5)


# --------------------------------------------------------------------------------------------------
# Training the interactive mode
# --------------------------------------------------------------------------------------------------

def test_interact_training_targets_pack_conditions_and_match_kv_cached_inference():
    """Training samples in the interactive layout: the segment's packed forward (conditions in the pack, no
    condition noise) gives the logits of the KV-cached inference on the same segment."""
    from infinitystar.train.config import ScaleSubsetConfig
    from infinitystar.train.targets import PackedTrainModule, pack_batch, packed_loss, prepare_interact_samples
    model = _model()
    T = PYRAMID.frames_per_clip
    z = _latents(11, 1 + 3 * T)[0]                                   # three whole clips
    clean = InteractConfig(semantic_scale=2, condition_noise=[0.0])
    gen = torch.Generator().manual_seed(0)
    first, seg = prepare_interact_samples(z, PYRAMID, 1 + 4 * 3 * T, clean, ["c0", "c1", "c2", "c3"],
                                          [0, 0, 1, 2], gen, subset=ScaleSubsetConfig(), bsc_strength=0.0)
    assert first.schedule.num_clips == 2 and not first.conditions and first.captions == ["c0"]
    assert seg.schedule.conditions and len(seg.steps) == len(seg.schedule.scales)
    k = {"c1": 2, "c2": 3}[seg.captions[0]]                          # the drawn clip of the video
    start = 1 + (k - 1) * T
    s = segment_schedule(PYRAMID, clean)
    maps = condition_maps(z[None, :, start - 1 - T:start], z[None, :, :1], s)
    assert [c.shape for c in seg.conditions] == [(45, 64), (180, 64)]
    assert torch.equal(seg.conditions[0], maps["semantic"][0].flatten(1).T)
    text = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    batch = pack_batch([first, seg], [[text], [text]], TINY.text_maxlen, 32, "cpu")
    assert batch.tokens == batch.packed.num_visual + 225 + 8
    logits, anchor = PackedTrainModule(model)(batch.x_visual, batch.captions, batch.packed, "sdpa", None,
                                              batch.conditions)
    teacher = encode_targets(z[None, :, start:start + T], s)
    out = generate(model, s, Caption(text[None]), conditions=maps, prefix_bits=teacher.bits, record_logits=True)
    seg_logits = [lg for (b, _), lg in zip(batch.packed.visual_segments, logits) if b == 1]
    for st, lg in zip(seg.steps, seg_logits):
        if st.is_last_repetition:                                   # inference caches the last repetition
            assert torch.allclose(lg, out.logits[st.index]["cond"][0], atol=2e-5), st
    loss = packed_loss(logits, batch, anchor).loss
    loss.backward()
    assert torch.isfinite(loss) and model.word_embed.weight.grad.abs().sum() > 0
    # a video of one clip trains in the text-to-video layout; condition noise changes the blocks
    (only,) = prepare_interact_samples(z[:, :1 + T], PYRAMID, 1 + 4 * T, clean, ["c0"], [0, 0], gen,
                                       subset=ScaleSubsetConfig())
    assert not only.schedule.conditions
    noisy = prepare_interact_samples(z, PYRAMID, 1 + 12 * T, InteractConfig(semantic_scale=2, condition_noise=[0.3]),
                                     ["c0", "c1", "c2", "c3"], [0, 0, 1, 2], torch.Generator().manual_seed(0),
                                     first_segment=False, subset=ScaleSubsetConfig(), bsc_strength=0.0)
    assert len(noisy) == 1 and noisy[0].captions == seg.captions
    assert not torch.equal(noisy[0].conditions[0], seg.conditions[0])
    assert torch.equal(noisy[0].conditions[1][:60], seg.conditions[1][:60])   # latent 0 of the detail block


@pytest.mark.slow
def test_interact_training_run_learns_and_exports_an_interact_model(tmp_path):
    from test_train import losses, run_training, tiny_config, write_dataset
    from infinitystar.train.config import ConfigError, config_from_dict
    from infinitystar.train.export import export_model
    manifest = write_dataset(tmp_path / "data", n_videos=4, n_images=0, frames=33)
    raw = tiny_config(tmp_path / "run", manifest, interact={"semantic_scale": 2},
                      data={"max_frames": 33},
                      train={"max_steps": 10, "micro_batch": 1, "bsc_strength": 0.1, "text_dropout": 0.0},
                      optim={"lr": 3e-3, "warmup_steps": 1, "decay": "constant"}, checkpoint={"every": 0})
    res = run_training(raw)
    ls = losses(tmp_path / "run")
    assert len(ls) == 10 and all(map(torch.isfinite, torch.tensor(ls)))
    assert sum(ls[-3:]) < sum(ls[:3])
    from infinitystar.train.metrics import read_metrics
    last = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert "acc_video_s3" in last and "acc_image_s3" in last
    with pytest.raises(ConfigError, match="interact training needs videos of two clips"):
        config_from_dict({**raw, "data": {**raw["data"], "max_frames": 17}})
    with pytest.raises(ConfigError, match="interact: InteractConfig.semantic_scale 9 is not a scale"):
        config_from_dict({**raw, "interact": {"semantic_scale": 9}})
    with pytest.raises(ConfigError, match="interact: InteractConfig.condition_noise must list non-negative"):
        config_from_dict({**raw, "interact": {"condition_noise": [-1.0]}})
    # the exported model folder runs the interactive path
    pipe_dir = tmp_path / "model"
    tok = tmp_path / "tok"
    from infinitystar.tokenizer.video_vae import VideoVAE, VideoVAEConfig
    VideoVAE(VideoVAEConfig(block_out_channels=(4, 8, 8, 8), spatial_compression_list=(2, 2),
                            temporal_compression_list=(2, 2))).save_pretrained(tok)
    from infinitystar.shapes.world import vocabulary
    from infinitystar.text.builtin import WordTextEncoder
    WordTextEncoder(vocabulary(), width=32, depth=1, num_heads=2).save_pretrained(tmp_path / "text")
    export_model(res.checkpoint, pipe_dir, tokenizer=tok, text_encoder=tmp_path / "text")
    meta = json.loads((pipe_dir / "model_index.json").read_text())
    assert meta["inference"] == "interact" and meta["interact"]["semantic_scale"] == 2
    assert meta["defaults"]["tau_video"] == 0.5
