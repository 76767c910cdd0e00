"""Gate 1 of the built-in model at a tiny scale (scripts/overfit_check.py; docs/default_model_log.md): a generator that
has memorised one captioned image and one video gives them back when sampled through the pipeline."""
import pytest
import torch


@pytest.mark.slow
def test_memorised_samples_come_back_through_the_pipeline(tmp_path, load_script):
    torch.set_num_threads(2)
    report = load_script("scripts/overfit_check.py").overfit_check(tmp_path, n=1, steps=1000, lr=3e-3, overrides=[
        "model.preset=tiny", "model.width=128", "train.bsc_strength=0"])
    acc = report["final_bit_accuracy"]
    # memorised: the trainer's teacher-forced bit accuracy is ~1 on every scale it logged
    assert min(acc.values()) > 0.97, acc
    for weights in ("raw", "ema"):
        result = report[weights]
        # the inference path (KV cache, one step at a time) sees what training saw: ~1 on every step
        for row in result["default"]["samples"]:
            assert min(row["teacher_forced_accuracy"]) > 0.9, (weights, row["caption"], row["teacher_forced_accuracy"])
        # sampling without guidance gives the memorised samples back
        assert result["no_cfg"]["all_correct"] >= 0.95, (weights, result["no_cfg"]["samples"])
        # and so does guidance on bit probabilities: nearly every summed-code value equals the training target's
        # (logit CFG at scale 5 is not asserted: it flips bits both branches are sure of, docs/default_model_log.md)
        assert result["cfg_prob"]["code_agreement"] > 0.9, (weights, result["cfg_prob"]["samples"])
        assert result["no_cfg"]["code_agreement"] > 0.9, (weights, result["no_cfg"]["samples"])
