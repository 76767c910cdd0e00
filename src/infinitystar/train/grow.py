"""A deeper transformer that starts as the trained one: function-preserving depth growth.

New blocks go between the old ones, each a copy of the old block before it with its two residual outputs (the
attention's o_proj, the MLP's down_proj) zeroed. A pre-norm block whose residual outputs are zero adds nothing to
its input, so the grown model gives the old model's logits exactly; training it (`model.init_from`) starts from the
old model's loss with more capacity to spend. The copied weights give the zeroed projections non-zero gradients at
the first step, so the new blocks start learning at once.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Union

import torch

from infinitystar.checkpoint_io import load_strict
from infinitystar.model.infinitystar import InfinityStarTransformer

# a block's parameters that write into the residual stream (a new block starts with them at zero)
RESIDUAL_OUTPUTS = ("attn.o_proj.weight", "attn.o_proj.bias", "mlp.down_proj.weight")


def growth_plan(old_depth: int, new_depth: int) -> list[tuple[int, bool]]:
    """For each block of the grown model: (old block its weights come from, whether it is new). Old block i moves to
    position floor(i * new_depth / old_depth), so the new blocks spread evenly; a new block copies the old block
    before it."""
    if old_depth < 1 or new_depth <= old_depth:
        raise ValueError(f"growing depth {old_depth} to {new_depth}: the new depth must be larger than the old")
    position = {i * new_depth // old_depth: i for i in range(old_depth)}
    plan, source = [], 0
    for j in range(new_depth):
        fresh = j not in position
        source = source if fresh else position[j]
        plan.append((source, fresh))
    return plan


def grow_transformer(model: InfinityStarTransformer, depth: int) -> InfinityStarTransformer:
    """`model` deepened to `depth` blocks by `growth_plan` (float32, on the CPU, in eval mode)."""
    plan = growth_plan(model.config.depth, depth)
    state = {k: v.float().cpu() for k, v in model.state_dict().items() if not k.startswith("blocks.")}
    for j, (i, fresh) in enumerate(plan):
        for name, v in model.blocks[i].state_dict().items():
            v = v.float().cpu()
            state[f"blocks.{j}.{name}"] = torch.zeros_like(v) if fresh and name in RESIDUAL_OUTPUTS else v
    grown = InfinityStarTransformer(dataclasses.replace(model.config, depth=depth))
    load_strict(grown, state, f"the depth-{depth} growth of a depth-{model.config.depth} transformer")
    return grown.eval()


def grow_folder(src: Union[str, Path], dst: Union[str, Path], depth: int) -> Path:
    """Read a transformer folder (config.json + model.safetensors: a model folder's `transformer`, or an
    export), write its growth to `depth` blocks to `dst` (which must not exist yet) and return `dst`."""
    dst = Path(dst)
    if dst.exists():
        raise FileExistsError(f"{dst} exists: give a new folder")
    model = InfinityStarTransformer.from_pretrained(src)
    return grow_transformer(model, depth).save_pretrained(dst)
