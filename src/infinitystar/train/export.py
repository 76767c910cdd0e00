"""`infinitystar export CHECKPOINT OUT`: a training checkpoint -> a model folder that
`InfinityStarPipeline.from_pretrained(OUT)` loads (transformer, tokenizer, text encoder, model_index.json; a run
that trained the interactive mode exports an "interact" model folder).

The transformer takes the checkpoint's EMA weights when it has them (`ema=False`: the raw weights). A text encoder
trained with the generator is stored in the checkpoint under `text_encoder.*`: its architecture comes from the
run's `text_encoder.path` folder, its weights from the checkpoint. A frozen text encoder is copied as it is.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

from infinitystar.checkpoint_io import CheckpointError, load_strict, read_tensors
from infinitystar.model.infinitystar import InfinityStarTransformer, TransformerConfig
from infinitystar.pipelines.infinitystar import GenerationDefaults, InfinityStarPipeline
from infinitystar.text import load_text_encoder
from infinitystar.tokenizer.video_vae import VideoVAE
from infinitystar.train.checkpoint import TEXT_PREFIX, find_resume, is_complete, read_json, read_meta
from infinitystar.train.config import config_from_dict

PathLike = Union[str, Path]


def resolve_checkpoint(path: PathLike) -> Path:
    """A checkpoint folder, or a run folder / its `checkpoints/` (-> the latest complete checkpoint)."""
    p = Path(path)
    if is_complete(p):
        return find_resume(p.parent, str(p))
    for root in (p / "checkpoints", p):
        found = find_resume(root, "latest")
        if found is not None:
            return found
    raise CheckpointError(f"{p}: no complete training checkpoint (a step_* folder with trainer.json and "
                          f"model.safetensors, or a run folder holding them)")


def export_model(checkpoint: PathLike, out: PathLike, *, ema: bool = True, tokenizer: Optional[PathLike] = None,
                 text_encoder: Optional[PathLike] = None, defaults: Optional[dict] = None) -> Path:
    """Write the model folder `out` from a checkpoint; `tokenizer` / `text_encoder` override the run's paths
    (the text encoder's only for its architecture when it was trained). Returns the checkpoint used."""
    ckpt = resolve_checkpoint(checkpoint)
    meta = read_meta(ckpt)
    run = config_from_dict(meta["config"])
    weights_file = ckpt / ("ema.safetensors" if ema and meta.get("has_ema") else "model.safetensors")
    sd = read_tensors(weights_file)
    text_sd = {k[len(TEXT_PREFIX):]: v for k, v in sd.items() if k.startswith(TEXT_PREFIX)}
    model_sd = {k: v for k, v in sd.items() if not k.startswith(TEXT_PREFIX)}

    config_dict = read_json(ckpt / "config.json")
    config_dict.pop("type", None)
    config = TransformerConfig.from_dict(config_dict)
    transformer = InfinityStarTransformer(config)
    load_strict(transformer, model_sd, str(weights_file))

    tok_path = tokenizer or run.tokenizer.path
    text_path = text_encoder or run.text_encoder.path
    if tok_path is None or text_path is None:
        raise CheckpointError(f"{ckpt}: the run has no {'tokenizer' if tok_path is None else 'text_encoder'}.path; "
                              f"pass it explicitly")
    text = load_text_encoder(text_path)
    if run.text_encoder.trainable:
        if not text_sd:
            raise CheckpointError(f"{weights_file}: the run trained its text encoder but the file has no "
                                  f"{TEXT_PREFIX}* weights")
        load_strict(text, text_sd, f"{weights_file} ({TEXT_PREFIX}*)")
    elif text_sd:
        raise CheckpointError(f"{weights_file}: holds {TEXT_PREFIX}* weights but the run's text encoder was frozen")

    pyramid = run.pyramid.build()
    h, w = pyramid.spatial_scales()[-1]
    px = run.data.pixels_per_latent
    base = GenerationDefaults.interact() if run.interact else GenerationDefaults()
    pipe = InfinityStarPipeline(transformer.eval(), VideoVAE.from_pretrained(tok_path), text.eval(), pyramid,
                                h * px, w * px, GenerationDefaults(**{**dataclasses.asdict(base), **(defaults or {})}),
                                interact=run.interact)
    pipe.save_pretrained(out)
    return ckpt

