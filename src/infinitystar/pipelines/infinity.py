"""`InfinityPipeline`: Infinity text-to-image (prompt(s) in, RGB images out).

A model folder holds `model_index.json` ({"family": "infinity", "defaults": {...}}; every default may be left out)
and three sub-folders, each loadable on its own: `transformer/` (`InfinityTransformer`), `tokenizer/` (the
`InfinityVAE`) and `text_encoder/` (a flan-t5-xl folder, or the built-in word encoder).

The image size follows the official dynamic-resolution tables: an aspect ratio h/w picks the nearest of the 15
templates and a pixel budget `pn` a prefix of its 13 scales; the image is the last grid times the token stride
(16 pixels for the 2B, 8 x 2x2 patchify for the 8B). Sizes that are not a template are snapped, with a warning.
A model trained at one small size instead (the Shapes World model: 64x64 images, 8x8 latents) names its own
schedule in `defaults.scales`; it then always generates that schedule, anchored (RoPE-2D) to its last grid as in
training, and a different size, ratio or budget is an error.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from infinitystar.memory import MemoryOptions, text_encoder_running
from infinitystar.model.infinity import InfinityConfig, InfinityTransformer
from infinitystar.pipelines.base import (Callback, GuidanceDefaults, ImagePipelineOutput, ModelCard, ModelIndex,
                                         Pipeline, postprocess)
from infinitystar.sampling.bits import Generators
from infinitystar.sampling.guidance import Guidance
from infinitystar.sampling.infinity_generate import generate_infinity
from infinitystar.schedules.infinity_resolution import (PN_NUM_SCALES, Scale2D, all_templates, check_custom_scales,
                                                        nearest_template, pixel_size)
from infinitystar.shapes.world import vocabulary
from infinitystar.text.builtin import WordTextEncoder
from infinitystar.tokenizer.infinity_vae import InfinityVAE, InfinityVAEConfig

# A ratio further than this factor from every template is refused rather than silently bent into shape.
MAX_SNAP_FACTOR = 1.5
_SAME_RATIO = 0.01    # within 1 % a ratio *is* its template (the table spells 2/3 as 0.666)


@dataclass
class InfinityDefaults(GuidanceDefaults):
    """Sampling defaults (reference/infinity.md 6.2: the 2B's notebooks use cfg 3, tau 0.5; the 8B's tau 1.0;
    top-p 0.97 drops a bit value of probability <= 0.03)."""
    temperature: float = 0.5
    top_p: float = 0.97
    pn: str = "1M"
    aspect_ratio: float = 1.0     # h/w
    scales: Optional[list[list[int]]] = None   # a fixed custom schedule (replaces the templates; see the module doc)

    def __post_init__(self):
        super().__post_init__()
        if self.scales is not None:
            self.scales = [list(s) for s in check_custom_scales(self.scales, "defaults.scales")]
        if self.pn not in PN_NUM_SCALES:
            raise ValueError(f"unknown pixel budget pn={self.pn!r}; choose one of {', '.join(PN_NUM_SCALES)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        self.aspect_ratio = parse_aspect_ratio(self.aspect_ratio)


def parse_aspect_ratio(value: Union[float, int, str]) -> float:
    """h/w from a number (0.5625) or a 'width:height' string ('16:9' -> 9/16, a landscape image)."""
    try:
        if isinstance(value, str) and ":" in value:
            w, h = (float(v) for v in value.split(":"))
            r = h / w
        else:
            r = float(value)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"aspect ratio {value!r}: give h/w as a number (0.5625) or width:height ('16:9')") from None
    if not (math.isfinite(r) and r > 0):
        raise ValueError(f"aspect ratio {value!r}: h/w must be a positive finite number")
    return r


@dataclass(frozen=True)
class Resolution:
    template: float
    pn: str
    scales: list[Scale2D]
    height: int
    width: int
    rope_anchor: Optional[Scale2D] = None   # None: the template's 1M grid


@dataclass
class InfinityPipelineOutput(ImagePipelineOutput):
    """`ImagePipelineOutput` plus the size that was generated (the template and budget a request snapped to)."""
    resolution: Optional[Resolution] = None

    _SIZE_FIELDS = ("height", "width", "template", "pn", "scales")

    def __getattr__(self, name: str):
        """`out.height`, `.width`, `.template`, `.pn`, `.scales`: those of `resolution`."""
        if name in InfinityPipelineOutput._SIZE_FIELDS and self.resolution is not None:
            return getattr(self.resolution, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


class InfinityPipeline(Pipeline):
    family = "infinity"
    transformer_class = InfinityTransformer
    tokenizer_class = InfinityVAE
    default_output_type = "pil"

    def __init__(self, transformer: InfinityTransformer, tokenizer: InfinityVAE, text_encoder,
                 defaults: Optional[InfinityDefaults] = None, card: Optional[ModelCard] = None,
                 precision: str = "auto", memory: Optional[MemoryOptions] = None):
        tc, vc = transformer.config, tokenizer.config
        if tc.latent_channels != vc.codebook_dim:
            hint = ""
            if tc.latent_channels == 4 * vc.codebook_dim and not tc.spatial_patchify:
                hint = (" (an 8B transformer: convert it with --preset infinity_8b, its 2x2 spatial patchify "
                        "is not visible in the weights)")
            raise ValueError(f"the transformer reads {tc.latent_channels}-channel codes, the tokenizer makes "
                             f"{vc.codebook_dim}{hint}")
        if text_encoder.channels != tc.text_channels:
            raise ValueError(f"the text encoder gives {text_encoder.channels} channels, the transformer reads "
                             f"{tc.text_channels}")
        # Of the memory options an image model uses the text encoder's placement (its largest scale is 4096
        # tokens: token chunks and tiles would not help, and its blocks are also called outside their forward).
        if memory is not None and memory.sequential_offload:
            raise ValueError("sequential offload is available for InfinityStar (video) models only")
        super().__init__(transformer, tokenizer, text_encoder, defaults or InfinityDefaults(), card, precision, memory)

    @property
    def token_stride(self) -> int:
        """Pixels per transformer token side."""
        return self.tokenizer.config.patch_size * (2 if self.transformer.config.spatial_patchify else 1)

    # --- persistence ----------------------------------------------------------------------------------------------
    @classmethod
    def _read_index(cls, index: ModelIndex) -> dict:
        where = f"{index.path / 'model_index.json'} defaults"
        return dict(defaults=InfinityDefaults.from_dict(index.field("defaults", dict, {}), where))

    def index_fields(self) -> dict:
        return {}

    @classmethod
    def random_tiny(cls, seed: int = 0, device=None) -> "InfinityPipeline":
        """A tiny random-weight pipeline (Shapes World vocabulary, 4 pixels per token, pn 0.06M: 64x64 images at
        1:1): it runs every code path, its outputs are noise. For tests and demos."""
        torch.manual_seed(seed)
        text = WordTextEncoder(vocabulary(), width=32, depth=1, num_heads=2, max_len=32).eval()
        vae = InfinityVAE(InfinityVAEConfig(codebook_dim=16, patch_size=4, base_ch=32, encoder_ch_mult=(1, 1, 1),
                                            decoder_ch_mult=(1, 1, 1), num_res_blocks=1)).eval()
        transformer = InfinityTransformer(InfinityConfig(
            depth=2, width=64, num_heads=2, latent_channels=16, text_channels=text.channels, text_maxlen=32,
            pooler_head_dim=16, cond_drop_rate=0.0)).eval()
        pipe = cls(transformer, vae, text, InfinityDefaults(pn="0.06M"))
        return pipe.to(device) if device is not None else pipe

    # --- size -----------------------------------------------------------------------------------------------------
    def resolution(self, height: Optional[int] = None, width: Optional[int] = None,
                   aspect_ratio: Union[float, str, None] = None, pn: Optional[str] = None,
                   warn: bool = True, stacklevel: int = 2) -> Resolution:
        """The template, scales and pixel size for a request: an aspect ratio (h/w or 'W:H') and a budget pn, or
        a height and width (the budget whose area is nearest, unless pn is given). Snapping warns."""
        if (height is None) != (width is None):
            raise ValueError("give both height and width, or an aspect_ratio")
        if height is not None and aspect_ratio is not None:
            raise ValueError("give either height and width or aspect_ratio, not both")
        if self.defaults.scales is not None:
            return self._custom_resolution(height, width, aspect_ratio, pn)
        if height is not None:
            if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
                raise ValueError(f"height and width must be positive integers, got {height!r} x {width!r}")
            ratio, asked = height / width, f"{width}x{height}"
        else:
            ratio = parse_aspect_ratio(self.defaults.aspect_ratio if aspect_ratio is None else aspect_ratio)
            asked = f"aspect ratio {aspect_ratio!r} (h/w {ratio:.4g})" if aspect_ratio is not None else None
        template = nearest_template(ratio)
        factor = max(ratio / template, template / ratio)
        if factor > MAX_SNAP_FACTOR:
            keys = sorted(all_templates())
            raise ValueError(f"aspect ratio h/w {ratio:.4g} is too far from the model's templates (h/w "
                             f"{keys[0]} to {keys[-1]}, about 3:1 landscape to 1:3 portrait)")
        grids = all_templates()[template]
        if pn is None and height is not None:   # the budget whose area is nearest the request (log scale)
            area = lambda p: math.prod(pixel_size(grids[:PN_NUM_SCALES[p]], self.token_stride))
            pn = min(PN_NUM_SCALES, key=lambda p: abs(math.log(area(p) / (height * width))))
        pn = pn or self.defaults.pn
        if pn not in PN_NUM_SCALES:
            raise ValueError(f"unknown pixel budget pn={pn!r}; choose one of {', '.join(PN_NUM_SCALES)}")
        scales = grids[:PN_NUM_SCALES[pn]]
        H, W = pixel_size(scales, self.token_stride)
        snapped = (height is not None and (H, W) != (height, width)) or (
            height is None and abs(ratio / template - 1) > _SAME_RATIO)
        if warn and asked and snapped:
            warnings.warn(f"{asked} snapped to the nearest template h/w {template}: generating {W}x{H} (WxH) "
                          f"at pn {pn}", UserWarning, stacklevel=stacklevel)
        return Resolution(template, pn, scales, H, W)

    def _custom_resolution(self, height, width, aspect_ratio, pn) -> Resolution:
        """The model's own schedule: any other size, ratio or budget is refused (the model never saw it)."""
        scales = [tuple(s) for s in self.defaults.scales]
        H, W = pixel_size(scales, self.token_stride)
        where = f"this model generates only {W}x{H} images (its custom schedule {[list(s) for s in scales]})"
        if pn is not None:
            raise ValueError(f"pn={pn!r} does not apply: {where}")
        if height is not None and (height, width) != (H, W):
            raise ValueError(f"size {width}x{height} (WxH) requested: {where}")
        if aspect_ratio is not None and abs(parse_aspect_ratio(aspect_ratio) / (H / W) - 1) > _SAME_RATIO:
            raise ValueError(f"aspect ratio {aspect_ratio!r} requested: {where}")
        return Resolution(H / W, "custom", scales, H, W, rope_anchor=scales[-1])

    # --- generation -----------------------------------------------------------------------------------------------
    @torch.no_grad()      # text features, bits and frames: no autograd graph holds the weights' copies
    def __call__(self, prompt: Union[str, Sequence[str]], height: Optional[int] = None, width: Optional[int] = None,
                 *, aspect_ratio: Union[float, str, None] = None, pn: Optional[str] = None,
                 negative_prompt: Union[str, Sequence[str], None] = None, num_images_per_prompt: int = 1,
                 guidance_scale: Union[float, Sequence[float], None] = None, guidance: Optional[Guidance] = None,
                 temperature: Optional[float] = None, top_p: Optional[float] = None, generator: Generators = None,
                 output_type: str = "pil", return_dict: bool = True,
                 callback_on_step_end: Optional[Callback] = None, precision: Optional[str] = None):
        """Generate images.

        height/width or aspect_ratio (h/w, or 'W:H' such as '16:9') with pn ('0.06M', '0.25M', '0.60M', '1M')
        choose the size (see `resolution`). negative_prompt replaces the learned null text of the unconditional
        half (one text, or one per prompt). num_images_per_prompt: samples per prompt (outputs are prompt-major).
        guidance_scale: a number or one per scale; guidance: a `Guidance` (CFG as the reference, or APG;
        guidance_scale, if given, replaces its scale). temperature: tau of every scale; top_p: per-bit filter
        (0 = none). generator: one torch.Generator (CPU is fine on any device), or a list with one per output.
        output_type: "pil", "np" (float in [0, 1]), "uint8", "pt" or "codes" (no decoding); return_dict=False
        returns `(images,)`. callback_on_step_end(pipe, step, scale, kwargs) runs after every scale; setting
        `pipe._interrupt = True` stops. precision: "auto", "fp32" or "bf16" (default: the pipeline's).
        """
        t0 = time.perf_counter()
        self._check_call(num_images_per_prompt, output_type, "num_images_per_prompt")
        prompts = self._texts(prompt, "prompt")
        n = num_images_per_prompt
        negatives = self._negatives(negative_prompt, len(prompts), n)
        prompts = [p for p in prompts for _ in range(n)]
        res = self.resolution(height, width, aspect_ratio, pn, stacklevel=3)   # the warning names the caller
        d = self.defaults
        guide = self._guidance(guidance_scale, guidance)
        tau = d.temperature if temperature is None else float(temperature)
        top_p = d.top_p if top_p is None else float(top_p)
        if not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"temperature must be a positive number, got {tau}")
        with text_encoder_running(self.text_encoder, self.device, self.memory):
            text = self.text_encoder.encode(prompts, self.device)
            neg = None if negatives is None else self.text_encoder.encode(negatives, self.device)
        t1 = time.perf_counter()
        timing = {}

        def sample(on_step, dtype):
            out = generate_infinity(self.transformer, text.features, text.mask, res.scales, guidance=guide, tau=tau,
                                    top_p=top_p, generator=generator,
                                    negative_text=None if neg is None else neg.features,
                                    negative_mask=None if neg is None else neg.mask,
                                    rope_anchor=res.rope_anchor or all_templates()[res.template][-1],
                                    on_step=on_step, precision=dtype)
            timing["generate_s"] = time.perf_counter() - t1
            return out

        def decode(codes, dtype):
            return ((self.tokenizer.decode(codes, precision=dtype).float() + 1) / 2).clamp(0, 1)

        out, pixels, used = self._run(sample, decode, len(prompts), generator, len(res.scales),
                                      callback_on_step_end, precision, output_type)
        # uint8 is (x + 1) / 2 * 255 truncated, as the reference (which then flips to BGR; we keep RGB)
        images = out.codes if pixels is None else postprocess(pixels, output_type, truncate=True)
        t3 = time.perf_counter()
        timings = {"encode_s": t1 - t0, "generate_s": timing["generate_s"],
                   "decode_s": t3 - t1 - timing["generate_s"], "total_s": t3 - t0}
        result = InfinityPipelineOutput(images, out.codes, out.bits, timings, used, res)
        return result if return_dict else result.to_tuple()


__all__ = ["InfinityPipeline", "InfinityPipelineOutput", "InfinityDefaults", "Resolution", "parse_aspect_ratio"]
