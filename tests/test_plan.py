"""`infinitystar plan`: the simulator's bookkeeping, FLOP counting and placement, plans of real pipelines, the CLI,
and the check against measured peaks of real CPU runs."""
import json

import pytest
import torch
import torch.nn.functional as F

from infinitystar.bench import generation_flops
from infinitystar.cli import main
from infinitystar.memory import DecodeOffload, MemoryOptions, place_transformer
from infinitystar.model.infinitystar import InfinityStarTransformer, TransformerConfig
from infinitystar.plan import LADDER, PlanError, Simulator, plan, resolve
from infinitystar.plan.simulate import register_module
from infinitystar.sampling.generate import Caption, generate
from infinitystar.sampling.guidance import Guidance
from infinitystar.schedules.pyramid import PyramidConfig

META = torch.device("meta")


def test_storages_are_booked_when_made_and_freed_when_dropped():
    with Simulator() as sim:
        with sim.stage("s") as st:
            a = torch.empty(1000, device=META)            # 4000 bytes -> one 4096-byte allocator block
            assert sim.device_bytes == 4096
            b = a * 2
            assert sim.device_bytes == 8192
            del a, b
            assert sim.device_bytes == 0
            c = torch.empty(10, device=META)              # 40 bytes -> 512
            assert sim.device_bytes == 512
            del c
    assert st.peak_bytes == 8192 and st.end_bytes == 0


def test_views_and_in_place_ops_cost_nothing():
    with Simulator() as sim:
        x = torch.empty(64, 64, device=META)
        before = sim.device_bytes
        views = [x.view(4096), x.t(), x[:, 3:7], x.unsqueeze(0).expand(3, 64, 64), *x.split(16)]
        x.mul_(2)
        views[0].add_(1)
        assert sim.device_bytes == before
        assert all(sim.entry(v) is sim.entry(x) for v in views)
        for _ in range(3):                                 # memoised repeats build the same views
            assert x.t().shape == (64, 64) and x.t().stride() == (1, 64)
            assert x[:, 3:7].storage_offset() == 3


def test_exact_bytes_for_the_cpu_profile():
    with Simulator("cpu") as sim:
        x = torch.empty(10, device=META, dtype=torch.bfloat16)
        y = torch.empty(3, device=META, dtype=torch.bfloat16)
        assert sim.device_bytes == 26 and x.shape != y.shape


def test_host_and_device_moves():
    with Simulator() as sim:
        with sim.stage("s") as st:
            w = torch.empty(256, device=META)
            h = w.to("cpu")
            assert (sim.device_bytes, sim.host_bytes) == (1024, 1024) and sim.is_host(h)
            del w
            assert (sim.device_bytes, sim.host_bytes) == (0, 1024)
            d = h.to(META)
            assert sim.device_bytes == 1024 and not sim.is_host(d)
            y = h * 2                                      # an op on host data runs on the host
            assert sim.is_host(y) and sim.device_bytes == 1024
            same = d.to(META)
            assert same is d
    assert st.transfer_bytes == 2048                       # one copy each way


def test_small_values_are_known_and_large_ones_are_not():
    with Simulator() as sim:
        mask = torch.ones(2, 3, dtype=torch.bool, device=META)
        assert bool(mask.all())
        assert torch.arange(5, device=META).sum().item() == 10
        ids = torch.tensor([[5, 6, 7]]).to(META)
        assert (ids[0, 1] + 1).item() == 7
        big = torch.empty(100_000, device=META)
        with pytest.raises(PlanError, match="values"):
            float(big.sum())
        mask[0, 0] = big[0] > 0                              # an unknown value written in: no longer known
        with pytest.raises(PlanError):
            bool(mask.all())


def test_finite_checks_of_the_real_code_pass():
    """A plan assumes finite numbers: the generation's check on its logits must not stop it."""
    with Simulator():
        logits = torch.empty(2, 5000, 64, 2, device=META)
        finite = torch.isfinite(logits)
        assert bool(finite.all()) and not bool((~finite).any())
        with pytest.raises(PlanError):
            bool((logits > 0).all())                     # any other value stays unknown


def test_matmul_and_attention_flops():
    with Simulator() as sim:
        with sim.stage("mm") as mm:
            a, b = torch.empty(64, 128, device=META), torch.empty(128, 32, device=META)
            a @ b
        q = torch.empty(1, 4, 16, 8, device=META)
        k = torch.empty(1, 2, 20, 8, device=META)
        with sim.stage("attention") as att:
            out = F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    assert out.shape == q.shape
    assert mm.flops == 2 * 64 * 32 * 128 and mm.workspace_bytes == 32 * 2 ** 20     # cuBLAS workspace
    assert att.flops == 4 * 4 * 16 * 20 * 8
    # a fused kernel: the output and the log-sum-exp rows, never a (16 x 20) score matrix per head
    assert att.peak_bytes - att.start_bytes == 2048 + 512


def test_generation_flops_match_the_analytic_count():
    """The simulated KV-cached generation counts the matmul FLOPs the closed-form count of `bench` gives."""
    cfg = TransformerConfig(width=64, depth=2, num_heads=2, num_kv_heads=1, text_channels=32, text_maxlen=32,
                            null_text_len=32)
    schedule = PyramidConfig(pn=None, custom_scales=[[1, 1], [2, 2], [4, 4]], frames_per_clip=2,
                             video_repetition=[2, 1, 1], detail_min_tokens=16).build(17)
    with Simulator() as sim:
        with torch.device(META):
            model = InfinityStarTransformer(cfg).eval()
        register_module(sim, model, host=False)
        with sim.stage("g") as st:
            cap = Caption(torch.empty(1, 6, cfg.text_channels, device=META))
            generate(model, schedule, cap, guidance=Guidance(3.0), generator=torch.Generator().manual_seed(0))
    # bench's closed form leaves out text_proj and counts word_embed for both guidance halves; generate embeds
    # once and repeats the rows
    text_proj = 2 * 2 * 6 * cfg.text_channels * cfg.width
    word_embed_once = sum(2 * s.scale.tokens * cfg.latent_channels * cfg.width for s in schedule.steps)
    assert st.flops == generation_flops(cfg, schedule, 2, 6) + text_proj - word_embed_once


def test_offload_for_decode_parks_the_resident_weights_and_brings_them_back():
    """On the simulated device: inside the decode only what must stay is on the device, the same Parameter objects
    come back, the host copies are reused by the next call, and every byte crosses the link once each way."""
    cfg = TransformerConfig(width=64, depth=2, num_heads=2, text_channels=32, text_maxlen=32, null_text_len=32)
    with Simulator() as sim:
        with torch.device(META):
            model = InfinityStarTransformer(cfg).eval()
            text = torch.nn.Linear(32, 32)
        raw = register_module(sim, model, host=False), register_module(sim, text, host=False)   # unrounded bytes
        params = dict(model.named_parameters())
        total = sim.device_bytes
        text_bytes = sim._round(32 * 32 * 4) + sim._round(32 * 4)
        park = DecodeOffload()
        for opts, stays, moved in ((MemoryOptions(offload_for_decode=True, text_encoder="device"), 0, sum(raw)),
                                   (MemoryOptions(offload_for_decode=True, text_encoder="device"), 0, sum(raw)),
                                   (MemoryOptions(offload_for_decode=True), text_bytes, raw[0]),
                                   (MemoryOptions(), total, 0)):
            with sim.stage("decode") as st:
                with park(model, text, META, opts):
                    assert sim.device_bytes == stays
                    assert sim.host_bytes == total - stays             # the kept host copies, not one more
                assert sim.device_bytes == total
            assert st.transfer_bytes == 2 * moved
        assert dict(model.named_parameters()) == params and all(p.device == META for p in params.values())
        assert sim.host_bytes == 0                                    # off: the host copies are let go
        # sequential offload: the blocks wait on the host anyway; only the rest of the transformer moves
        del params
        whole = sum(sim.entry(t).nbytes for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
        blocks = sum(sim.entry(p).nbytes for p in model.blocks.parameters())
        seq = MemoryOptions(offload_for_decode=True, sequential_offload=True)
        hooks = place_transformer(model, META, seq)
        on_device = sim.device_bytes
        assert on_device == total - blocks
        with park(model, text, META, seq):
            assert sim.device_bytes == on_device - (whole - blocks)          # the text encoder is placed "offload"
        assert sim.device_bytes == on_device
        hooks.remove()


@pytest.fixture(scope="module")
def default_plan():
    return plan(resolve("default"))


def test_plan_of_the_shipped_model(default_plan):
    r = default_plan
    names = [s["name"] for s in r.stages]
    assert names == ["load", "text", "transformer", "decode"]
    weights = sum(p.numel() * p.element_size() for p in
                  InfinityStarTransformer.from_pretrained(resolve("default").name + "/transformer").parameters())
    load = r.stages[0]
    assert load["weights_bytes"] >= weights // 2                   # bf16 transformer plus the others
    assert r.peak_bytes == max(s["peak_bytes"] for s in r.stages)
    assert r.stages[2]["flops"] > 0 and r.stages[3]["flops"] > 0
    assert r.flops == pytest.approx(sum(s["flops"] for s in r.stages))
    assert set(r.gpu_times) == {"mfu", "A100-80GB", "H100-80GB", "H200-141GB"}


def test_plan_books_the_kv_cache_and_the_offloads():
    target = resolve("default")
    r = plan(target, MemoryOptions(text_encoder="offload", token_chunk=None, sequential_offload=True))
    text, gen = r.stages[1], r.stages[2]
    assert gen["kv_cache_bytes"] > 0                                          # captions and referenced scales
    pipe = target.build(torch.bfloat16, 16)
    block_bytes = sum(p.numel() * p.element_size() for p in pipe.transformer.blocks.parameters())
    passes = 1 + len(pipe.pyramid.build(target.call["num_frames"]).steps)   # the caption, then every step
    assert gen["transfer_bytes"] == passes * block_bytes                     # every block visits every pass
    one = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in pipe.transformer.blocks)
    extra = gen["weights_bytes"] - r.stages[0]["weights_bytes"]             # blocks on the device at the peak
    assert 0 < extra <= one + 512 * len(list(pipe.transformer.blocks[0].parameters()))   # one block at a time
    assert text["transfer_bytes"] > 0                                        # the encoder visits the device


def test_unknown_target_is_a_user_error(capsys):
    assert main(["plan", "no-such-model"]) == 2
    assert "not a model name" in capsys.readouterr().err


def test_cli_plan_json(capsys):
    assert main(["plan", "default", "--json", "--frames", "9"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out["peak_bytes"], int) and out["peak_bytes"] > 0 and out["flops"] > 0
    assert [s["name"] for s in out["stages"]] == ["load", "text", "transformer", "decode"]
    assert out["options"] == MemoryOptions().to_dict()


def test_cli_plan_compare_walks_the_option_ladder(capsys):
    assert main(["plan", "default", "--compare", "--json", "--frames", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["label"]: r for r in out["compare"]}
    assert list(rows) == [label for label, _ in LADDER]
    assert rows["defaults"]["peak_bytes"] == out["peak_bytes"]            # the plan printed above the ladder
    for label, opts in LADDER:
        assert rows[label]["options"] == MemoryOptions(**opts).to_dict()
        assert rows[label]["peak_bytes"] == max(rows[label]["stages"].values())
    seq = rows["defaults + sequential offload"]
    assert seq["stages"]["transformer"] < rows["defaults"]["stages"]["transformer"]     # one block at a time
    assert seq["flops"] == pytest.approx(rows["defaults"]["flops"])                     # the same work
    assert seq["gpu_times"]["H100-80GB"]["total_s"] > rows["defaults"]["gpu_times"]["H100-80GB"]["total_s"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tiny-generate", "tiny-generate-chunked", "tiny-decode", "tiny-decode-chunk1"])
def test_predicted_peak_matches_a_real_cpu_run(case):
    """Issue 17's bar: within 10 % of the measured peak (docs/gpu.md lists the larger cases, all within 3 %)."""
    from infinitystar.plan.validate import CASES, measure, predict
    pred, meas = predict(CASES[case]), measure(CASES[case])
    assert abs(pred - meas) <= 0.10 * meas, (pred, meas)
