"""T5 text encoder on a tiny random T5 and a word-level tokenizer built here (no download)."""
import json
import shutil
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from infinitystar.checkpoint_io import CheckpointError  # noqa: E402
from infinitystar.text.base import TextEncoder, TextFeatures  # noqa: E402
from infinitystar.text.t5 import T5TextEncoder  # noqa: E402

WORDS = "a red circle moves left small blue square on black background two green triangles rotate slowly".split()
PAD, EOS, UNK = 0, 1, 2


def _build_dir(d):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    vocab = {"<pad>": PAD, "</s>": EOS, "<unk>": UNK, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                      special_tokens=[("</s>", EOS)])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                               unk_token="<unk>", model_max_length=512)
    cfg = transformers.T5Config(d_model=32, num_layers=2, num_heads=2, d_kv=16, d_ff=64, vocab_size=len(vocab),
                                feed_forward_proj="gated-gelu", pad_token_id=PAD, eos_token_id=EOS)
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(cfg).eval()
    model.save_pretrained(str(d), safe_serialization=True)
    tok.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return _build_dir(tmp_path_factory.mktemp("tiny_t5"))


@pytest.fixture(scope="module")
def enc(t5_dir):
    return T5TextEncoder.from_pretrained(t5_dir, device="cpu")


PROMPTS = ["a red circle", "two green triangles on black background moves"]


def test_shapes_lengths_mask(enc):
    assert isinstance(enc, TextEncoder) and enc.channels == 32
    out = enc.encode(PROMPTS, "cpu")
    assert isinstance(out, TextFeatures)
    assert out.features.shape == (2, 8, 32) and out.features.dtype == torch.float32
    assert out.lengths.dtype == torch.long and out.lengths.tolist() == [4, 8]      # words + EOS
    assert out.mask.dtype == torch.bool and out.mask.sum(1).tolist() == [4, 8]
    assert out.mask[0].tolist() == [True] * 4 + [False] * 4
    ids, mask = enc.tokenize(PROMPTS)
    assert torch.equal(mask, out.mask)
    assert ids[0, 3].item() == EOS and ids[1, 7].item() == EOS and ids[0, 4:].eq(PAD).all()
    assert out.features[0, 4:].eq(0).all() and out.features[0, :4].abs().sum() > 0
    feats, mask2 = enc.encode(PROMPTS)      # unpacks like the (features, mask) pair of older callers
    assert torch.equal(feats, out.features) and torch.equal(mask2, out.mask)


def test_valid_rows_equal_official_max_length_run(enc):
    out = enc.encode(PROMPTS)
    tok = enc.tokenizer(PROMPTS, max_length=512, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = enc.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state.float()
    lens = tok["attention_mask"].sum(1)
    assert lens.tolist() == out.lengths.tolist()
    for i, n in enumerate(lens.tolist()):
        torch.testing.assert_close(out.features[i, :n], ref[i, :n], atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_valid_rows(enc):
    alone = enc.encode(["a red circle"])
    batched = enc.encode(["a red circle", "small blue square on black background two green triangles rotate"])
    assert batched.features.shape[1] > alone.features.shape[1]
    torch.testing.assert_close(batched.features[0, :4], alone.features[0, :4], atol=1e-5, rtol=1e-5)


def test_compact_is_the_official_varlen_form(enc):
    out = enc.encode(PROMPTS)
    c = out.compact()
    assert c.features.shape == (12, 32)
    assert c.cu_seqlens.dtype == torch.int32 and c.cu_seqlens.tolist() == [0, 4, 12]
    assert c.lengths.tolist() == [4, 8] and c.max_seqlen == 8
    assert torch.equal(c.features, torch.cat([out.features[0, :4], out.features[1, :8]]))
    kv, lens, cu, max_len = c      # the reference's tuple order
    assert kv is c.features and max_len == 8


def test_frozen_eval_and_dtype(t5_dir, enc):
    assert not enc.training and not enc.model.training
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training
    assert enc.dtype == torch.float32       # CPU default
    e64 = T5TextEncoder.from_pretrained(t5_dir, torch_dtype=torch.float64)
    assert e64.dtype == torch.float64
    f = e64.encode(PROMPTS).features
    assert f.dtype == torch.float32
    torch.testing.assert_close(f, enc.encode(PROMPTS).features, atol=1e-5, rtol=1e-5)


def test_truncation_keeps_eos_and_warns(t5_dir):
    short = T5TextEncoder.from_pretrained(t5_dir, max_length=5)
    with pytest.warns(UserWarning, match="truncated to 5 tokens"):
        out = short.encode(["small blue square on black background", "a red circle"])
    assert out.lengths.tolist() == [5, 4]
    ids, _ = short.tokenize(["a red circle"])
    assert ids[0, -1].item() == EOS


def test_save_pretrained_round_trip(tmp_path, enc):
    enc.save_pretrained(tmp_path / "te")
    again = T5TextEncoder.from_pretrained(tmp_path / "te")
    assert torch.equal(again.encode(PROMPTS).features, enc.encode(PROMPTS).features)


def test_empty_prompts_are_errors(enc):
    for bad in ([], [""], ["a red circle", "   "]):
        with pytest.raises(ValueError, match="empty|no prompts"):
            enc.encode(bad)
    with pytest.raises(ValueError, match="not a string"):
        enc.encode([3])


def test_missing_directory_and_files(tmp_path, t5_dir):
    with pytest.raises(FileNotFoundError, match=r"no such directory.*config\.json.*tokenizer_config\.json"):
        T5TextEncoder.from_pretrained(tmp_path / "nowhere")
    d = tmp_path / "partial"
    shutil.copytree(t5_dir, d)
    (d / "tokenizer.json").unlink()
    (d / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json or spiece\.model; tokenizer_config\.json"):
        T5TextEncoder.from_pretrained(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors or model\.safetensors\.index\.json"):
        T5TextEncoder.from_pretrained(d)


def test_sharded_index_and_missing_shard(tmp_path, t5_dir, enc):
    from safetensors.torch import load_file, save_file
    d = tmp_path / "sharded"
    shutil.copytree(t5_dir, d)
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    keys = sorted(sd)
    half = len(keys) // 2
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for name, part in zip(names, (keys[:half], keys[half:])):
        save_file({k: sd[k] for k in part}, str(d / name), metadata={"format": "pt"})
    weight_map = {k: names[0] if i < half else names[1] for i, k in enumerate(keys)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded = T5TextEncoder.from_pretrained(d)
    assert torch.equal(loaded.encode(PROMPTS).features, enc.encode(PROMPTS).features)
    (d / names[1]).unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        T5TextEncoder.from_pretrained(d)


def test_missing_encoder_weight_is_an_error(tmp_path, t5_dir):
    from safetensors.torch import load_file, save_file
    d = tmp_path / "holes"
    shutil.copytree(t5_dir, d)
    sd = load_file(str(d / "model.safetensors"))
    key = "encoder.block.1.layer.0.SelfAttention.q.weight"
    del sd[key]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        T5TextEncoder.from_pretrained(d)


def test_not_a_t5_config(tmp_path, t5_dir):
    d = tmp_path / "bert"
    shutil.copytree(t5_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert' is not 't5'"):
        T5TextEncoder.from_pretrained(d)


def test_missing_transformers_has_install_hint(monkeypatch, t5_dir):
    monkeypatch.setitem(sys.modules, "transformers", None)     # import transformers -> ImportError
    with pytest.raises(ImportError, match=r'pip install "infinitystar\[t5\]"'):
        T5TextEncoder.from_pretrained(t5_dir)


def test_full_encoder_decoder_checkpoint_loads(tmp_path, t5_dir):
    """The released flan-t5 folders hold T5ForConditionalGeneration weights: the decoder half is ignored."""
    d = tmp_path / "seq2seq"
    shutil.copytree(t5_dir, d)
    (d / "model.safetensors").unlink()
    cfg = transformers.T5Config.from_pretrained(str(d))
    torch.manual_seed(1)
    full = transformers.T5ForConditionalGeneration(cfg).eval()
    full.save_pretrained(str(d), safe_serialization=True)
    enc = T5TextEncoder.from_pretrained(d)
    tok = enc.tokenizer(PROMPTS, padding="longest", return_tensors="pt")
    with torch.no_grad():
        ref = full.encoder(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
    out = enc.encode(PROMPTS)
    torch.testing.assert_close(out.features, ref * out.mask[..., None], atol=1e-6, rtol=1e-6)
