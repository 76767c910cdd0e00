import pytest
import torch

from infinitystar.checkpoint_io import CheckpointError
from infinitystar.convert.official import load_official_transformer, official_to_ours, ours_to_official
from infinitystar.model.attention import AttentionContext, _grouped_sdpa, attend, dense_mask, segment_groups
from infinitystar.model.infinitystar import InfinityStarTransformer, TransformerConfig
from infinitystar.model.layers import PackedWeights, linear
from infinitystar.model.packing import PackSample, pack_sequence, select_steps
from infinitystar.quant.residual import encode_targets
from infinitystar.sampling.generate import Caption, generate
from infinitystar.sampling.guidance import Guidance
from infinitystar.schedules.pyramid import PyramidConfig
from infinitystar.train.targets import reference_closure

TINY = TransformerConfig(width=64, depth=2, num_heads=4, num_kv_heads=2, text_channels=16, text_maxlen=16,
                         null_text_len=32)


def _model(seed=0, config=TINY):
    torch.manual_seed(seed)
    m = InfinityStarTransformer(config).eval()
    with torch.no_grad():   # make every parameter matter (the from-scratch init has zero biases, unit norms)
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _pyramid(**kw):
    base = dict(pn=None, custom_scales=[[1, 1], [2, 2], [3, 4]], frames_per_clip=2,
                image_repetition=[2, 1, 2], video_repetition=[1, 2, 2], detail_min_tokens=12)
    return PyramidConfig(**{**base, **kw})


@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_kv_cached_generation_equals_packed_teacher_forced_forward(attention):
    model = _model()
    schedule = _pyramid(attention=attention).build(17)           # image + 2 clips of 2 latent frames
    z = torch.randn(1, 64, schedule.num_latent_frames, 3, 4, generator=torch.Generator().manual_seed(1))
    targets = encode_targets(z, schedule)
    text = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    out = generate(model, schedule, Caption(text[None]), prefix_bits=targets.bits, record_logits=True)
    assert torch.equal(out.codes, targets.codes)
    steps = select_steps(schedule, repetition="last")            # inference caches the last repetition
    packed = pack_sequence([PackSample(schedule, steps, [5])], TINY.text_maxlen, pad_multiple=32)
    x = torch.cat([targets.inputs[st.index][0] for st in steps])
    logits = model.forward_packed(x, [text], packed)
    for st, lg in zip(steps, logits):
        assert torch.allclose(lg, out.logits[st.index]["cond"][0], atol=2e-5), st


def test_a_first_frame_reading_every_caption_is_the_same_in_training_and_generation():
    """caption_of_clip [(0, 1), 0, 1] (`first_frame_all_captions`): the first frame reads both captions, in their
    order (`caption_orders`), in the packed training forward as in KV-cached generation; the second caption then
    changes the first frame's logits, which it cannot do with [0, 0, 1]."""
    model = _model()
    schedule = _pyramid().build(17)
    z = torch.randn(1, 64, schedule.num_latent_frames, 3, 4, generator=torch.Generator().manual_seed(1))
    targets = encode_targets(z, schedule)
    g = torch.Generator().manual_seed(2)
    texts = [torch.randn(5, 16, generator=g), torch.randn(3, 16, generator=g)]
    of_clip = [(0, 1), 0, 1]
    out = generate(model, schedule, [Caption(t[None]) for t in texts], caption_of_clip=of_clip,
                   prefix_bits=targets.bits, record_logits=True)
    steps = select_steps(schedule, repetition="last")
    packed = pack_sequence([PackSample(schedule, steps, [5, 3], of_clip)], TINY.text_maxlen, pad_multiple=32)
    logits = model.forward_packed(torch.cat([targets.inputs[st.index][0] for st in steps]), texts, packed)
    for st, lg in zip(steps, logits):
        assert torch.allclose(lg, out.logits[st.index]["cond"][0], atol=2e-5), st
    first = lambda of, second: generate(model, schedule, [Caption(texts[0][None]), Caption(second[None])],
                                        caption_of_clip=of, prefix_bits=targets.bits, record_logits=True).logits[0]
    other = torch.randn(3, 16, generator=g)
    assert not torch.allclose(first(of_clip, texts[1])["cond"], first(of_clip, other)["cond"])
    assert torch.equal(first([0, 0, 1], texts[1])["cond"], first([0, 0, 1], other)["cond"])
    # the order counts: the same two captions the other way round give the first frame other logits
    swapped = generate(model, schedule, [Caption(texts[1][None]), Caption(texts[0][None])], caption_of_clip=of_clip,
                       prefix_bits=targets.bits, record_logits=True).logits[0]
    assert (swapped["cond"] - out.logits[0]["cond"]).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"must name one \(or a tuple\) of 2 captions"):
        generate(model, schedule, [Caption(t[None]) for t in texts], caption_of_clip=[(0, 2), 0, 1])


def test_random_repetition_of_a_reference_scale_changes_the_context():
    # the official training path packs a random repetition of the referenced scale; inference uses the last one
    model = _model()
    schedule = _pyramid(image_repetition=[1, 1, 2]).build(9)
    z = torch.randn(1, 64, schedule.num_latent_frames, 3, 4, generator=torch.Generator().manual_seed(1))
    t = encode_targets(z, schedule)
    text = torch.randn(3, 16)
    def clip_logits(rep_of_ref):
        steps = select_steps(schedule, repetition="last")
        steps[2] = schedule.scale_steps(2)[rep_of_ref]
        packed = pack_sequence([PackSample(schedule, steps, [3])], 16)
        x = torch.cat([t.inputs[st.index][0] for st in steps])
        return model.forward_packed(x, [text], packed)
    last, first = clip_logits(1), clip_logits(0)
    assert torch.allclose(last[0], first[0]) and not torch.allclose(last[3], first[3])


def test_segment_mask_hand_checked():
    schedule = _pyramid(frames_per_clip=1, image_repetition=[1, 1, 1], video_repetition=[1, 1, 1]).build(9)
    assert schedule.num_clips == 3
    steps = select_steps(schedule, [0, 1, 2, 3, 5, 6], repetition="last")
    sample = PackSample(schedule, steps, [2, 3], caption_of_clip=[0, 0, 1])
    packed = pack_sequence([sample], 16, pad_multiple=16)
    # segments: 0..5 visual (scales 0,1,2,3,5,6), 6 caption 0, 7 caption 1, 8 padding
    expected = torch.zeros(9, 9, dtype=torch.bool)
    for q, cols in {0: [0, 6], 1: [1, 6], 2: [2, 6], 3: [3, 2, 6], 4: [4, 2, 6], 5: [5, 4, 7],
                    6: [6], 7: [7]}.items():
        expected[q, cols] = True
    assert torch.equal(packed.segment_table, expected)
    assert packed.segment_lengths == [1, 4, 12, 1, 12, 1, 2, 3, 12]
    m = dense_mask(packed.document_id, packed.segment_table)
    assert not m[-12:].any()                                    # official semantics: padding sees nothing
    assert packed.attention_table()[8, 8]                       # ...but attends to itself here (no NaN)
    # a selected scale whose reference scale is not packed is an error
    with pytest.raises(ValueError, match="attends to scale 2, which is not packed"):
        pack_sequence([PackSample(schedule, select_steps(schedule, [0, 3], repetition="last"), [2])], 16)


def test_padding_rows_never_produce_nan_and_flex_equals_sdpa():
    # (flex runs eagerly here: it materialises the scores, fine at this size)
    model = _model()
    schedule = _pyramid().build(9)
    steps = select_steps(schedule, repetition="last")
    packed = pack_sequence([PackSample(schedule, steps, [4])], 16, pad_multiple=128)
    assert packed.length - packed.num_visual - packed.num_text > 0
    x = torch.randn(packed.num_visual, 64)
    text = torch.randn(4, 16)
    model.train()
    out = model.forward_packed(x, [text], packed)
    assert all(torch.isfinite(o).all() for o in out)
    sum(o.sum() for o in out).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        a = model.forward_packed(x, [text], packed, backend="sdpa")
        b = model.forward_packed(x, [text], packed, backend="flex")
    assert max((u - v).abs().max().item() for u, v in zip(a, b)) < 1e-5


@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_grouped_attention_equals_the_dense_mask_forward_and_backward(attention):
    """Several samples of different lengths, caption lengths, scale subsets and a padded tail: the grouped
    execution (no masked pair computed) gives the dense-mask logits and parameter gradients."""
    model = _model().train()
    pyr = _pyramid(attention=attention)
    g = torch.Generator().manual_seed(3)
    samples, x, texts = [], [], []
    for frames, scales, cap_lens in [(17, None, [5, 3]), (9, [0, 1, 2, 4], [2]), (1, [0, 2], [7]), (1, [0, 2], [7])]:
        schedule = pyr.build(frames)
        steps = select_steps(schedule, scales and reference_closure(schedule, scales), generator=g)
        of_clip = [(0, 1), 0, 1] if len(cap_lens) == 2 else None   # the first frame reads both captions
        samples.append(PackSample(schedule, steps, cap_lens, of_clip))
        x += [torch.randn(st.scale.tokens, 64, generator=g) for st in steps]
        texts += [torch.randn(n, 16, generator=g) for n in cap_lens]
    packed = pack_sequence(samples, TINY.text_maxlen, pad_multiple=64)
    assert packed.length > packed.num_visual + packed.num_text
    groups = packed.attention_groups()
    assert sum(len(gr.queries) for gr in groups.groups) == len(packed.segment_lengths) - 1   # all but padding
    assert len(groups.groups) < len(packed.segment_lengths) - 1                              # some are stacked
    x = torch.cat(x)
    results = {}
    for backend in ("sdpa", "grouped"):
        model.zero_grad()
        logits = model.forward_packed(x, texts, packed, backend=backend)
        sum((lg * torch.linspace(-1, 1, lg.numel()).view_as(lg)).sum() for lg in logits).backward()
        results[backend] = (logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (la, ga), (lb, gb) = results["sdpa"], results["grouped"]
    assert max((u - v).abs().max().item() for u, v in zip(la, lb)) < 1e-5
    assert ga.keys() == gb.keys()
    for n in ga:   # fp32 sums in another order: equal to ~1e-5 of the gradient's scale
        assert (ga[n] - gb[n]).abs().max() <= 1e-5 * ga[n].abs().max(), n


def test_segment_groups_follow_the_table():
    table = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    sg = segment_groups([3, 3, 2, 5], table)
    # segments 0 and 1 both have 3 queries and 3 + 2 keys: one group; the caption alone; padding in none
    assert [(gr.q_len, gr.kv_len, gr.queries, gr.keys) for gr in sg.groups] == [(3, 5, [0, 1], [0, 2, 1, 2]),
                                                                               (2, 2, [2], [2])]
    with pytest.raises(ValueError, match="unknown attention backend"):
        _model().forward_packed(torch.randn(1, 64), [torch.randn(2, 16)],
                                pack_sequence([PackSample(_pyramid().build(1), select_steps(_pyramid().build(1), [0]),
                                                          [2])], 16), backend="dense")


def test_bf16_generation_keeps_logits_close_and_heads_in_float32():
    model = _model()
    schedule = _pyramid().build(9)
    cap = Caption(torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(4)))
    z = torch.randn(1, 64, schedule.num_latent_frames, 3, 4, generator=torch.Generator().manual_seed(1))
    forced = encode_targets(z, schedule).bits           # same inputs at every step in both precisions
    kw = dict(guidance=Guidance(2.0), prefix_bits=forced, record_logits=True)
    a = generate(model, schedule, cap, **kw)
    b = generate(model, schedule, cap, precision=torch.bfloat16, **kw)
    for la, lb in zip(a.logits, b.logits):
        assert lb["guided"].dtype == torch.float32
        err = (la["guided"] - lb["guided"]).abs().max()
        assert 0 < err <= 0.05 * la["guided"].abs().max()


def test_caption_per_clip_only_affects_its_clips():
    model = _model()
    schedule = _pyramid().build(17)         # image + 2 clips
    cap_a, cap_b, cap_c = (Caption(torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(s)))
                           for s in (1, 2, 3))
    def logits(second):
        out = generate(model, schedule, [cap_a, second], caption_of_clip=[0, 0, 1], greedy=True,
                       record_logits=True, prefix_bits=[])
        return out
    o1, o2 = logits(cap_b), logits(cap_c)
    clip2_first = schedule.clip_scales(2)[0].index
    first_step_clip2 = next(st.index for st in schedule.steps if st.scale.index == clip2_first)
    for i in range(first_step_clip2):
        assert torch.equal(o1.logits[i]["cond"], o2.logits[i]["cond"])
    assert not torch.allclose(o1.logits[first_step_clip2]["cond"], o2.logits[first_step_clip2]["cond"])


def test_sampling_is_seeded_and_prefix_skips_work_without_changing_results():
    model = _model()
    schedule = _pyramid().build(9)
    cap = Caption(torch.randn(2, 4, 16))
    kw = dict(guidance=Guidance(3.0), tau=[1.0] * 3 + [0.5] * 3)
    a = generate(model, schedule, cap, generator=torch.Generator().manual_seed(7), **kw)
    b = generate(model, schedule, cap, generator=torch.Generator().manual_seed(7), **kw)
    c = generate(model, schedule, cap, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a.codes, b.codes) and not torch.equal(a.codes, c.codes)
    n_image_steps = sum(s.repetitions for s in schedule.clip_scales(0))
    prefix = a.bits[:n_image_steps]
    fast = generate(model, schedule, cap, prefix_bits=prefix, greedy=True, **kw)
    full = generate(model, schedule, cap, prefix_bits=prefix, greedy=True, record_logits=True, **kw)
    assert torch.equal(fast.codes, full.codes)
    assert all(torch.equal(x, y) for x, y in zip(fast.bits[:n_image_steps], prefix))


def test_kv_cache_stays_bounded_with_sparse_attention():
    model = _model()
    cap = Caption(torch.randn(1, 4, 16))
    peaks = {}
    for attention in ("sparse", "dense"):
        for frames in (17, 49):      # 2 and 6 video clips
            out = generate(model, _pyramid(attention=attention).build(frames), cap, greedy=True)
            peaks[attention, frames] = out.peak_cache_bytes
    assert peaks["sparse", 17] == peaks["sparse", 49]
    assert peaks["dense", 49] > 2 * peaks["dense", 17]


def test_padded_captions_in_a_batch_match_unpadded_runs():
    model = _model()
    schedule = _pyramid().build(5)
    short, long = torch.randn(1, 3, 16), torch.randn(1, 6, 16)
    feats = torch.zeros(2, 6, 16)
    feats[0, :3], feats[1] = short[0], long[0]
    mask = torch.tensor([[True] * 3 + [False] * 3, [True] * 6])
    batch = generate(model, schedule, Caption(feats, mask), greedy=True, guidance=Guidance(2.0), record_logits=True)
    alone = generate(model, schedule, Caption(short), greedy=True, guidance=Guidance(2.0), record_logits=True)
    assert torch.allclose(batch.logits[-1]["guided"][0], alone.logits[-1]["guided"][0], atol=1e-5)


def test_official_key_map_round_trip_and_strict_errors():
    model = _model()
    ours = model.state_dict()
    official = ours_to_official(ours, block_chunks=2)
    assert "block_chunks.1.module.0.input_layernorm.weight" in official and "cfg_uncond" in official
    official["sos_token"] = torch.zeros(1, 1, 64)            # present in every official file, unused
    loaded = load_official_transformer(official, TINY)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ours.items())
    flat = ours_to_official(ours, block_chunks=1)
    assert "blocks.1.mlp.down_proj.weight" in flat
    assert set(official_to_ours(flat)) == set(ours)

    missing = dict(official)
    del missing["block_chunks.1.module.0.attn.k_norm.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.attn\.k_norm\.weight"):
        load_official_transformer(missing, TINY)
    extra = dict(official, **{"head.extra": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected keys: head\.extra"):
        load_official_transformer(extra, TINY)
    bad = dict(official, **{"word_embed.weight": torch.zeros(64, 32)})
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: word_embed\.weight \(checkpoint \(64, 32\)"):
        load_official_transformer(bad, TINY)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of 8"):
        TransformerConfig(width=60, num_heads=2)
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
        TransformerConfig(width=64, num_heads=4, num_kv_heads=3)


def test_reads_sharded_safetensors_and_training_pth(tmp_path):
    import json
    from safetensors.torch import save_file
    from infinitystar.convert.official import read_official_transformer
    model = _model()
    official = ours_to_official(model.state_dict(), block_chunks=2)
    keys = sorted(official)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: official[k].contiguous() for k in ks}, str(tmp_path / name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    loaded = load_official_transformer(tmp_path, TINY)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    torch.save({"args": {}, "trainer": {"gpt_fsdp": official}}, tmp_path / "global_step_10.pth")
    assert set(read_official_transformer(tmp_path / "global_step_10.pth")) == set(official)
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pth: cannot read checkpoint"):
        read_official_transformer(tmp_path / "broken.pth")


def test_grouped_attention_runs_in_float32_under_bf16_autocast_on_the_cpu():
    """The CPU's bf16 flash-attention backward is slow at segment sizes, so grouped attention upcasts: under
    autocast its output is the float32 result of the same inputs rounded to bf16, and gradients flow back."""
    table = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    sg = segment_groups([3, 3, 2, 5], table)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 13, 8, generator=g).bfloat16().requires_grad_()
    k, v = (torch.randn(1, 2, 13, 8, generator=g).bfloat16().requires_grad_() for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q, k, v, AttentionContext(groups=sg), 0)
        in_bf16 = _grouped_sdpa(q, k, v, sg, True)
    ref = _grouped_sdpa(q.float(), k.float(), v.float(), sg, True)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref.to(torch.bfloat16))
    assert not torch.equal(in_bf16, out)          # the bf16 kernel would have given other numbers
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q, k, v))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_packed_weights_give_the_layer_products_and_follow_weight_changes(monkeypatch):
    """CPU inference on oneDNN-packed weights: the layer's products (fp32 to rounding, bf16 as under autocast), an
    fp32 weight packed once it has seen FP32_AFTER_ROWS rows, a changed weight repacked, nothing with autograd."""
    monkeypatch.setattr(PackedWeights, "FP32_AFTER_ROWS", 100)
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96)
    x = torch.randn(3, 40, 64)                                     # 120 rows per product
    packed = PackedWeights()
    close = lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    with packed.use():
        y = linear(layer, x)                                       # autograd on: the layer itself
        assert y.requires_grad and torch.equal(y, layer(x)) and len(packed) == 0
        with torch.no_grad():
            assert torch.equal(linear(layer, x), layer(x)) and len(packed) == 0    # 120 rows seen, not packed
            assert close(linear(layer, x), layer(x)) and len(packed) == 1
            layer.weight.mul_(-2)                                  # in place: its version counter moves
            assert close(linear(layer, x), layer(x))
            layer.weight = torch.nn.Parameter(torch.randn(96, 64))  # another tensor
            assert close(linear(layer, x), layer(x))
            if torch.ops.mkldnn._is_mkldnn_bf16_supported():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    got, want = linear(layer, x), layer(x)
                assert got.dtype == want.dtype == torch.bfloat16
                assert torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    with torch.no_grad():                                          # closed: the layer itself
        assert torch.equal(linear(layer, x), layer(x))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_generation_on_packed_weights_keeps_the_logits(monkeypatch):
    monkeypatch.setattr(PackedWeights, "FP32_AFTER_ROWS", 0)      # pack every fp32 weight at once
    model = _model()
    schedule = _pyramid().build(9)
    cap = Caption(torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(4)))
    z = torch.randn(1, 64, schedule.num_latent_frames, 3, 4, generator=torch.Generator().manual_seed(1))
    kw = dict(guidance=Guidance(2.0), prefix_bits=encode_targets(z, schedule).bits, record_logits=True)
    a = generate(model, schedule, cap, pack_weights=False, **kw)
    b = generate(model, schedule, cap, **kw)
    assert torch.equal(a.codes, b.codes)
    for la, lb in zip(a.logits, b.logits):
        assert torch.allclose(la["guided"], lb["guided"], atol=2e-5)


@pytest.mark.parametrize("rows", [5, 16])
def test_cpu_row_blocks_of_a_cached_pass_give_the_one_pass_numbers(rows):
    """KV-cached CPU inference runs the work around each attention call on blocks of token rows (`Block`);
    blocks of 2 or 8 tokens (CFG batch 2), uneven against the scales' 1-24 tokens, give the one-pass logits."""
    model = _model()
    schedule = _pyramid().build(17)
    cap = Caption(torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(4)))
    z = torch.randn(1, 64, schedule.num_latent_frames, 3, 4, generator=torch.Generator().manual_seed(1))
    kw = dict(guidance=Guidance(2.0), prefix_bits=encode_targets(z, schedule).bits, record_logits=True)
    model.set_cpu_block_rows(None)
    one = generate(model, schedule, cap, **kw)
    model.set_cpu_block_rows(rows)
    blocked = generate(model, schedule, cap, **kw)
    assert torch.equal(one.codes, blocked.codes)
    for a, b in zip(one.logits, blocked.logits):
        assert torch.allclose(a["guided"], b["guided"], atol=2e-5)


def test_swiglu_without_autograd_gives_the_autograd_numbers():
    """Without autograd the MLP computes SiLU and the product in place (on its own temporaries only)."""
    mlp = _model().blocks[0].mlp
    x = torch.randn(2, 7, TINY.width)
    x0 = x.clone()
    want = mlp(x)
    with torch.no_grad():
        got = mlp(x)
    assert want.requires_grad and torch.equal(got, want.detach()) and torch.equal(x, x0)
