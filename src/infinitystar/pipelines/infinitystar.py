"""`InfinityStarPipeline`: prompt(s) in, frames out (text-to-image, text-to-video, image-to-video, continuation,
long videos whose prompt changes clip by clip, and clip-by-clip streaming with `start` / `extend`).

A model folder holds `model_index.json` (pyramid, defaults, frame size, and `inference`: "clips" for text-to-video
models, "interact" for InfinityStar-Interact models, with optional `interact` settings) and three sub-folders, each
loadable on its own: `transformer/`, `tokenizer/` (the video VAE) and `text_encoder/` (the built-in word encoder or
a T5). What plays diffusers' `num_inference_steps` is the scale schedule (`pyramid`): one step per scale and
repetition.
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from infinitystar.media import as_uint8, load_image, load_video
from infinitystar.memory import MemoryOptions, text_encoder_running
from infinitystar.model.attention import segment_captions
from infinitystar.model.infinitystar import InfinityStarTransformer, TransformerConfig
from infinitystar.pipelines import stream as streaming
from infinitystar.pipelines.base import (DEFAULT_MODEL_DIR, Callback, GuidanceDefaults, ModelCard, ModelIndex,
                                         Pipeline, VideoPipelineOutput, postprocess)
from infinitystar.quant.interact import InteractConfig
from infinitystar.quant.residual import encode_targets
from infinitystar.runtime import precision_name
from infinitystar.sampling.bits import Generators
from infinitystar.sampling.generate import Caption, generate
from infinitystar.sampling.guidance import Guidance
from infinitystar.schedules.pyramid import PyramidConfig
from infinitystar.shapes.world import vocabulary
from infinitystar.text.builtin import WordTextEncoder
from infinitystar.tokenizer.video_vae import VideoVAE, VideoVAEConfig

PromptInput = Union[str, Sequence[str], Sequence[Sequence[str]]]


@dataclass
class GenerationDefaults(GuidanceDefaults):
    """Generation defaults of an InfinityStar model (model_index.json "defaults")."""
    tau_image: float = 1.0                # temperature of the image pyramid's scales
    tau_video: float = 0.4                # temperature of video clips' scales
    fps: int = 16                         # frame rate of written videos
    # a video with a prompt per segment: its first frame reads every segment's prompt, so it starts where the whole
    # prompted path fits (a model trained with data.first_frame_all_captions); each clip reads its own
    first_frame_all_prompts: bool = False

    def __post_init__(self):
        super().__post_init__()
        for name in ("tau_image", "tau_video"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if not (isinstance(self.fps, int) and self.fps > 0):
            raise ValueError(f"fps must be a positive integer, got {self.fps!r}")
        if not isinstance(self.first_frame_all_prompts, bool):
            raise ValueError(f"first_frame_all_prompts must be true or false, got {self.first_frame_all_prompts!r}")

    @classmethod
    def interact(cls) -> "GenerationDefaults":
        """The settings of the official interactive script (`tools/infer_interact_480p.py`): plain CFG 3, tau 0.5
        on every scale. An interact model folder starts from these; its model_index.json "defaults" override."""
        return cls(guidance_scale=3.0, guidance="cfg", tau_image=0.5, tau_video=0.5, fps=16)


class InfinityStarPipeline(Pipeline):
    """Text (and optionally a first frame or a video) to frames.

    `pipe(prompt, num_frames=...)` generates a whole video at once; `pipe.start(prompt)` starts a video that grows
    clip by clip (`stream.extend(next_prompt)`, `stream.video()`; see `infinitystar.pipelines.stream`).
    `interact` (an `InteractConfig`) makes an InfinityStar-Interact pipeline: its videos grow by interactive
    segments (model_index.json "inference": "interact").
    """
    family = "infinitystar"
    transformer_class = InfinityStarTransformer
    tokenizer_class = VideoVAE
    default_output_type = "np"

    def __init__(self, transformer: InfinityStarTransformer, tokenizer: VideoVAE, text_encoder,
                 pyramid: PyramidConfig, height: int, width: int, defaults: Optional[GenerationDefaults] = None,
                 interact: Optional[InteractConfig] = None, card: Optional[ModelCard] = None,
                 precision: str = "auto", memory: Optional[MemoryOptions] = None):
        """memory: where the parts live and in which pieces they run (see `infinitystar.memory`); it takes effect
        in `to(device)` (placement) and in every call (text encoder, token chunks, VAE tiles)."""
        defaults = defaults or (GenerationDefaults.interact() if interact else GenerationDefaults())
        super().__init__(transformer, tokenizer, text_encoder, defaults, card, precision, memory)
        self.pyramid = pyramid
        self.height, self.width = height, width
        if interact is not None:
            interact.check(pyramid)
        self.interact = interact
        self.memory = memory or MemoryOptions()
        self._offload = None

    @property
    def inference(self) -> str:
        """The inference path the model needs: "interact" (InfinityStar-Interact) or "clips"."""
        return "clips" if self.interact is None else "interact"

    # --- persistence ----------------------------------------------------------------------------------------
    @classmethod
    def _read_index(cls, index: ModelIndex) -> dict:
        where = str(index.path / "model_index.json")
        try:
            pyramid = PyramidConfig.from_dict(index.field("pyramid", dict))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: pyramid: {e}") from None
        height, width = index.field("height", int), index.field("width", int)
        if height < 1 or width < 1:
            raise ValueError(f"{where}: height and width must be positive, got {height} x {width}")
        inference = index.field("inference", str, "clips")
        if inference not in streaming.INFERENCE_KINDS:
            raise ValueError(f"{where}: unknown inference {inference!r}; choose one of "
                             f"{', '.join(streaming.INFERENCE_KINDS)}")
        if "interact" in index.data and inference != "interact":
            raise ValueError(f"{where}: \"interact\" settings need \"inference\": \"interact\"")
        try:
            interact = InteractConfig.from_dict(index.field("interact", dict, {})) if inference == "interact" else None
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: interact: {e}") from None
        base = dataclasses.asdict(GenerationDefaults.interact() if interact else GenerationDefaults())
        defaults = GenerationDefaults.from_dict({**base, **index.field("defaults", dict, {})}, f"{where} defaults")
        return dict(pyramid=pyramid, height=height, width=width, defaults=defaults, interact=interact)

    def index_fields(self) -> dict:
        fields = {"pyramid": self.pyramid.to_dict(), "height": self.height, "width": self.width,
                  "inference": self.inference}
        if self.interact is not None:
            fields["interact"] = self.interact.to_dict()
        return fields

    @classmethod
    def random_tiny(cls, seed: int = 0, device=None, interact: Optional[InteractConfig] = None
                    ) -> "InfinityStarPipeline":
        """A tiny random-weight pipeline with the default model's shapes (64x64 frames, 8x8 latents, Shapes World
        vocabulary): it runs every code path, but its outputs are noise. For tests and demos. `interact` makes it
        an InfinityStar-Interact pipeline (e.g. InteractConfig(semantic_scale=2))."""
        torch.manual_seed(seed)
        vae_cfg = VideoVAEConfig.small()
        text = WordTextEncoder(vocabulary(), width=32, depth=1, num_heads=2).eval()
        transformer = InfinityStarTransformer(TransformerConfig(
            width=64, depth=2, num_heads=2, text_channels=text.channels, text_maxlen=32, null_text_len=32,
            latent_channels=vae_cfg.codebook_dim, semantic_bits=vae_cfg.semantic_scale_dim)).eval()
        pyramid = PyramidConfig(pn=None, custom_scales=[[1, 1], [2, 2], [4, 4], [6, 6], [8, 8]], frames_per_clip=4,
                                temporal_compression=vae_cfg.temporal_stride, detail_min_tokens=36)
        pipe = cls(transformer, VideoVAE(vae_cfg).eval(), text, pyramid, 64, 64, interact=interact)
        return pipe.to(device) if device is not None else pipe

    # --- inputs -----------------------------------------------------------------------------------------------
    @staticmethod
    def _prompt_grid(prompt: PromptInput) -> list[list[str]]:
        if isinstance(prompt, str):
            grid = [[prompt]]
        elif prompt and all(isinstance(p, str) for p in prompt):
            grid = [[p] for p in prompt]
        else:
            grid = [list(p) for p in prompt] if prompt else []
        if not grid or any(not seg or any(not isinstance(s, str) or not s.strip() for s in seg) for seg in grid):
            raise ValueError("empty prompt: give a non-empty text (or a list of them) describing what to generate")
        n = max(len(seg) for seg in grid)
        return [seg + [seg[-1]] * (n - len(seg)) for seg in grid]

    def _to_tensor(self, frames: np.ndarray, what: str) -> torch.Tensor:
        """(B, T, H, W, 3) uint8 -> (B, 3, T, H, W) in [-1, 1] at the model's size (resized with a note)."""
        if frames.ndim != 5 or frames.shape[-1] != 3:
            raise ValueError(f"{what} must be RGB frames (H, W, 3), got shape {frames.shape[1:]}")
        x = torch.from_numpy(frames.astype(np.float32) / 127.5 - 1).permute(0, 4, 1, 2, 3)
        if frames.shape[2:4] != (self.height, self.width):
            warnings.warn(f"{what} of size {frames.shape[3]}x{frames.shape[2]} resized to the model's "
                          f"{self.width}x{self.height}", stacklevel=4)
            x = torch.nn.functional.interpolate(x, size=(x.shape[2], self.height, self.width), mode="trilinear",
                                                align_corners=False).clamp(-1, 1)
        return x.to(self.device)

    @staticmethod
    def _batch_media(media, batch: int, ndim: int, load, what: str) -> np.ndarray:
        """One item for every sample, or a list / stacked array of `batch` items. An item is a path, a uint8 or
        [0, 1] float array, a PIL image or (video) a list of them, as `as_uint8` takes."""
        single = isinstance(media, (str, Path, Image.Image)) or (
            isinstance(media, (np.ndarray, torch.Tensor)) and media.ndim == ndim)
        if isinstance(media, (list, tuple)) and ndim == 4 and media and isinstance(media[0], Image.Image):
            single = True                          # a video given as a list of PIL frames
        items = [media] if single else list(media)
        items = [load(m) if isinstance(m, (str, Path)) else as_uint8(m, what) for m in items]
        if len(items) == 1:
            items = items * batch
        if len(items) != batch:
            raise ValueError(f"{len(items)} {what}s given for {batch} prompts")
        if any(m.shape != items[0].shape for m in items):
            raise ValueError(f"every {what} must have the same shape")
        return np.stack(items)

    def _prefix(self, schedule, image, video, batch: int) -> list[torch.Tensor]:
        """Teacher bits of the given first frame (image-to-video) or frames (continuation)."""
        if image is not None and video is not None:
            raise ValueError("give either image (image-to-video) or video (continuation), not both")
        if image is None and video is None:
            return []
        if image is not None:
            x, clips = self._to_tensor(self._batch_media(image, batch, 3, load_image, "image")[:, None], "image"), 1
        else:
            frames = self._batch_media(video, batch, 4, load_video, "video")
            per_clip = self.pyramid.temporal_compression * self.pyramid.frames_per_clip
            clips = 1 + (frames.shape[1] - 1) // per_clip
            if clips < 2:
                raise ValueError(f"continuation needs at least {1 + per_clip} frames (one whole clip after the "
                                 f"first frame), got {frames.shape[1]}; use image= for a single frame")
            usable = 1 + (clips - 1) * per_clip
            if usable != frames.shape[1]:
                warnings.warn(f"continuation uses the first {usable} of {frames.shape[1]} given frames "
                              "(whole clips)", stacklevel=3)
            x = self._to_tensor(frames[:, :usable], "video")
        if clips >= schedule.num_clips:
            raise ValueError(f"nothing left to generate: the given media covers {clips} of {schedule.num_clips} "
                             "clips; ask for more frames")
        with torch.no_grad():
            return encode_targets(self.tokenizer.encode(x), schedule, num_clips=clips).bits

    # --- generation -------------------------------------------------------------------------------------------
    def start(self, prompt: str, *, inference: Optional[str] = None, image=None, video=None,
              guidance_scale: Optional[float] = None, temperature: Optional[float] = None,
              generator: Optional[torch.Generator] = None) -> "streaming.VideoStream":
        """Start a video that grows clip by clip; the returned stream's `clips[0]` holds its first frames.

            stream = pipe.start("a red circle moving right slowly on a black background")
            clip = stream.extend("a red circle moving up slowly on a black background")  # next clip's frames
            video = stream.video()                                                       # all frames so far

        Each `extend` costs the same however long the video is. prompt: the text of the first clip (with `video=`:
        the text of that video). image: the first frame (image-to-video). video: the start of the video (a path or
        frames); the stream continues after it. inference: "clips" or "interact" (default: the model folder's);
        "interact" needs an InfinityStar-Interact model. guidance_scale / temperature override the model's
        defaults for the whole stream; generator seeds the sampling (a CPU generator reproduces across devices).
        Batch size 1; frames are uint8; the pipeline's precision applies. See `infinitystar.pipelines.stream`.
        """
        return streaming.start(self, prompt, inference=inference, image=image, video=video,
                               guidance_scale=guidance_scale, temperature=temperature, generator=generator)

    @torch.no_grad()      # text features, bits and frames: no autograd graph holds the weights' copies
    def __call__(self, prompt: PromptInput, num_frames: int = 17, *, image=None, video=None,
                 negative_prompt: Union[str, Sequence[str], None] = None, num_videos_per_prompt: int = 1,
                 guidance_scale: Union[float, Sequence[float], None] = None, guidance: Optional[Guidance] = None,
                 temperature: Optional[float] = None, generator: Generators = None, output_type: str = "np",
                 return_dict: bool = True, callback_on_step_end: Optional[Callback] = None,
                 precision: Optional[str] = None):
        """Generate videos (or images with num_frames=1).

        prompt: a text, a list of texts (a batch), or a list of per-clip text lists (a long video whose prompt
        changes: clip k uses the k-th text, the first frame the first). num_frames: 1 (an image) or 1 + k x the
        pyramid's temporal compression (4 for the official models and the shipped default).
        image: the first frame (image-to-video); video: frames to continue (a path, an array, PIL images; one for
        every prompt or a list with one per prompt). negative_prompt: replaces the learned null text of the
        unconditional half (one text, or one per prompt). num_videos_per_prompt: samples per prompt (outputs are
        prompt-major). guidance_scale: a number or one per scale (the schedule's scales); guidance: a `Guidance`
        (CFG or APG with its settings; guidance_scale, if given, replaces its scale). temperature overrides both
        the image and the video temperatures. generator: one torch.Generator, or a list with one per output.
        output_type: "np" (float in [0, 1]), "uint8", "pt", "pil" or "codes" (no decoding). return_dict=False
        returns `(frames,)`. callback_on_step_end(pipe, step, scale, kwargs) runs after every step (kwargs:
        clip, shape, bits, forced, num_steps); setting `pipe._interrupt = True` stops, and what was generated so
        far is decoded. precision: "auto", "fp32" or "bf16" for the sampling and the decode (default: the
        pipeline's).
        """
        t0 = time.perf_counter()
        self._check_call(num_videos_per_prompt, output_type, "num_videos_per_prompt")
        grid = self._prompt_grid(prompt)
        n = num_videos_per_prompt
        negatives = self._negatives(negative_prompt, len(grid), n)
        if self.interact is not None:
            unsupported = [name for name, v in (("negative_prompt", negatives), ("guidance", guidance),
                                                ("callback_on_step_end", callback_on_step_end)) if v is not None]
            if isinstance(generator, Sequence):
                unsupported.append("a list of generators")
            if unsupported:
                raise ValueError(f"an interactive model streams its videos: {', '.join(unsupported)} cannot be "
                                 f"used with it")
            grid = [seg for seg in grid for _ in range(n)]
            return self._interact_video(grid, num_frames, image, video, guidance_scale, temperature, generator,
                                        output_type, return_dict, t0)
        schedule = self.pyramid.build(num_frames)
        d = self.defaults
        guide = self._guidance(guidance_scale, guidance)
        tau = [d.tau_image if s.clip == 0 else d.tau_video for s in schedule.scales]
        if temperature is not None:
            if not (math.isfinite(temperature) and temperature > 0):
                raise ValueError(f"temperature must be a positive number, got {temperature}")
            tau = [float(temperature)] * len(tau)
        prefix = [b.repeat_interleave(n, 0) for b in self._prefix(schedule, image, video, len(grid))]
        grid = [seg for seg in grid for _ in range(n)]
        mem = self.memory
        with text_encoder_running(self.text_encoder, self.device, mem):
            captions = [Caption(*self.text_encoder.encode([seg[k] for seg in grid], self.device))
                        for k in range(len(grid[0]))]
            negative_captions = None
            if negatives is not None:
                negative_captions = [Caption(*self.text_encoder.encode(negatives, self.device))] * len(captions)
        caption_of_clip = segment_captions(schedule.num_clips, len(captions), d.first_frame_all_prompts)
        t1 = time.perf_counter()
        self.transformer.set_token_chunk(mem.token_chunk)
        tiles = {} if mem.vae_tile is None else {"tile": mem.vae_tile, "tile_overlap": mem.vae_tile_overlap}
        timing = {}

        def sample(on_step, dtype):
            out = generate(self.transformer, schedule, captions, caption_of_clip=caption_of_clip, guidance=guide,
                           negative_captions=negative_captions, tau=tau, generator=generator, prefix_bits=prefix,
                           on_step=on_step, precision=dtype, pack_weights=self.packed_weights)
            timing["generate_s"] = time.perf_counter() - t1
            return out

        def decode(codes, dtype):
            return to_unit(self.tokenizer.decode(codes, precision=dtype, chunk=mem.vae_chunk, **tiles))

        out, pixels, used = self._run(sample, decode, len(grid), generator, len(schedule.steps),
                                      callback_on_step_end, precision, output_type)
        frames = out.codes if pixels is None else postprocess(pixels, output_type)
        t3 = time.perf_counter()
        timings = {"encode_s": t1 - t0, "generate_s": timing["generate_s"],
                   "decode_s": t3 - t1 - timing["generate_s"], "total_s": t3 - t0}
        result = VideoPipelineOutput(frames, out.codes, out.bits, timings, used)
        return result if return_dict else result.to_tuple()

    def _interact_video(self, grid, num_frames, image, video, guidance_scale, temperature, generator, output_type,
                        return_dict, t0):
        """An InfinityStar-Interact model makes a whole video by streaming it: the first clip, then one
        interactive segment per further clip (clip k uses the k-th text of its prompt list)."""
        per_clip = self.pyramid.frames_per_clip * self.pyramid.temporal_compression
        if num_frames < 1 + per_clip or (num_frames - 1) % per_clip:
            raise ValueError(f"an interactive model makes 1 + {per_clip}k frames (k >= 1 clips), got {num_frames}")
        if video is not None:
            raise ValueError("an interactive model starts from a video with pipe.start(prompt, video=...)")
        clips = (num_frames - 1) // per_clip
        frames, codes = [], []
        for seg in grid:
            texts = seg + [seg[-1]] * (clips - len(seg))
            stream = self.start(texts[0], image=image, guidance_scale=guidance_scale, temperature=temperature,
                                generator=generator)
            latents = [stream.last_codes]
            for text in texts[1:clips]:
                stream.extend(text)
                latents.append(stream.last_codes)
            frames.append(stream.video())
            codes.append(torch.cat(latents, dim=2))
        codes = torch.cat(codes)
        pixels = torch.from_numpy(np.stack(frames)).movedim(-1, 2).float() / 255     # exact: uint8 / 255 * 255
        result = VideoPipelineOutput(codes if output_type == "codes" else postprocess(pixels, output_type), codes,
                                     timings={"total_s": time.perf_counter() - t0},
                                     precision=precision_name(self.compute_dtype()))
        return result if return_dict else result.to_tuple()


def to_unit(video: torch.Tensor) -> torch.Tensor:
    """Decoded video (B, 3, T, H, W) in [-1, 1] -> (B, T, 3, H, W) in [0, 1], float32: the pipelines' pixels
    (`postprocess` makes uint8 as round(x * 255), the same values as `stream.to_frames`)."""
    return (video.float().clamp(-1, 1) + 1).div(2).transpose(1, 2)


__all__ = ["InfinityStarPipeline", "GenerationDefaults", "VideoPipelineOutput", "DEFAULT_MODEL_DIR"]
