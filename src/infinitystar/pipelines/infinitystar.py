"""`InfinityStarPipeline`: prompt(s) in, frames out (text-to-image, text-to-video, image-to-video, continuation,
long videos whose prompt changes clip by clip, and clip-by-clip streaming with `start` / `extend`).

A model folder holds `model_index.json` (pyramid, defaults, frame size, and `inference`: "clips" for text-to-video
models, "interact" for InfinityStar-Interact models, with optional `interact` settings) and three sub-folders, each
loadable on its own: `transformer/`, `tokenizer/` (the video VAE) and `text_encoder/` (the built-in word encoder or
a T5).
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol, Sequence, Union

import numpy as np
import torch

from infinitystar.config import InteractConfig, PyramidConfig, TransformerConfig
from infinitystar.memory import (MemoryOptions, home_devices, place_text_encoder, place_transformer,
                                 text_encoder_running)
from infinitystar.model.infinitystar import InfinityStarTransformer
from infinitystar.quant.residual import encode_targets
from infinitystar.pipelines import stream as streaming
from infinitystar.sampling.generate import Caption, generate
from infinitystar.text import load_text_encoder

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "weights" / "default"
PromptInput = Union[str, Sequence[str], Sequence[Sequence[str]]]


class VideoTokenizer(Protocol):
    def encode(self, video: torch.Tensor) -> torch.Tensor: ...      # (B,3,T,H,W) in [-1,1] -> (B,C,T',h,w)
    def decode(self, z: torch.Tensor) -> torch.Tensor: ...          # inverse


@dataclass
class GenerationDefaults:
    guidance_scale: float = 3.0
    guidance: str = "cfg"                 # "cfg" or "apg"
    apg_norm_threshold: float = 0.05
    tau_image: float = 1.0                # temperature of the image pyramid's scales
    tau_video: float = 0.4                # temperature of video clips' scales
    fps: int = 16

    @classmethod
    def interact(cls) -> "GenerationDefaults":
        """The settings of the official interactive script (`tools/infer_interact_480p.py`): plain CFG 3, tau 0.5
        on every scale. An interact model folder starts from these; its model_index.json "defaults" override."""
        return cls(guidance_scale=3.0, guidance="cfg", tau_image=0.5, tau_video=0.5, fps=16)


@dataclass
class PipelineOutput:
    frames: list[np.ndarray]              # one (T, H, W, 3) uint8 array per sample
    codes: torch.Tensor                   # (B, C, T_lat, h, w) latent code maps
    timings: dict = field(default_factory=dict)

    @property
    def images(self) -> list[np.ndarray]:
        """First frame of each sample (text-to-image)."""
        return [f[0] for f in self.frames]


def _load_tokenizer(d: Path, device):
    from infinitystar.tokenizer.video_vae import VideoVAE
    return VideoVAE.from_pretrained(d).to(device).eval()


class InfinityStarPipeline:
    """Text (and optionally a first frame or a video) to frames.

    `pipe(prompt, num_frames=...)` generates a whole video at once; `pipe.start(prompt)` starts a video that grows
    clip by clip (`stream.extend(next_prompt)`, `stream.video()`; see `infinitystar.pipelines.stream`).
    `interact` (an `InteractConfig`) makes an InfinityStar-Interact pipeline: its videos grow by interactive
    segments (model_index.json "inference": "interact").
    """

    def __init__(self, transformer: InfinityStarTransformer, tokenizer, text_encoder, pyramid: PyramidConfig,
                 height: int, width: int, defaults: Optional[GenerationDefaults] = None,
                 interact: Optional[InteractConfig] = None, memory: Optional[MemoryOptions] = None):
        """memory: where the parts live and in which pieces they run (see `infinitystar.memory`); it takes effect
        in `to(device)` (placement) and in every call (text encoder, token chunks, VAE tiles)."""
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.pyramid = pyramid
        self.height, self.width = height, width
        self.defaults = defaults or (GenerationDefaults.interact() if interact else GenerationDefaults())
        if interact is not None:
            interact.check(pyramid)
        self.interact = interact
        self.memory = memory or MemoryOptions()
        self._offload = None

    @property
    def inference(self) -> str:
        """The inference path the model needs: "interact" (InfinityStar-Interact) or "clips"."""
        return "clips" if self.interact is None else "interact"

    @property
    def device(self) -> torch.device:
        return self.transformer.word_embed.weight.device

    # --- persistence ----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: Union[str, Path, None] = "default", device=None,
                        memory: Optional[MemoryOptions] = None) -> "InfinityStarPipeline":
        """Load a model folder; no argument (or "default") loads the model shipped inside the package. Each part is
        read onto the device where the memory options keep it (see `to`)."""
        d = DEFAULT_MODEL_DIR if path in (None, "default") else Path(path)
        index = d / "model_index.json"
        if not index.is_file():
            hint = (" (the shipped default model is missing from this install)" if d == DEFAULT_MODEL_DIR
                    else "")
            raise FileNotFoundError(f"{d}: not an infinitystar model folder, no model_index.json{hint}")
        meta = json.loads(index.read_text())
        if meta.get("family", "infinitystar") != "infinitystar":
            raise ValueError(f"{d} holds a {meta.get('family')!r} model; use the matching pipeline")
        inference = meta.get("inference", "clips")
        if inference not in streaming.INFERENCE_KINDS:
            raise ValueError(f"{index}: unknown inference {inference!r}; choose one of "
                             f"{', '.join(streaming.INFERENCE_KINDS)}")
        if "interact" in meta and inference != "interact":
            raise ValueError(f"{index}: \"interact\" settings need \"inference\": \"interact\"")
        interact = InteractConfig.from_dict(meta.get("interact", {})) if inference == "interact" else None
        base = GenerationDefaults.interact() if interact else GenerationDefaults()
        defaults = GenerationDefaults(**{**base.__dict__, **meta.get("defaults", {})})
        memory = memory or MemoryOptions()
        home = home_devices(device or "cpu", memory)
        pipe = cls(InfinityStarTransformer.from_pretrained(d / "transformer", home["transformer"]),
                   _load_tokenizer(d / "tokenizer", home["tokenizer"]),
                   load_text_encoder(d / "text_encoder", home["text_encoder"]), PyramidConfig.from_dict(meta["pyramid"]),
                   int(meta["height"]), int(meta["width"]), defaults, interact, memory)
        return pipe.to(device or "cpu")

    def save_pretrained(self, path: Union[str, Path]) -> None:
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(d / "transformer")
        self.tokenizer.save_pretrained(d / "tokenizer")
        self.text_encoder.save_pretrained(d / "text_encoder")
        meta = {"family": "infinitystar", "pyramid": self.pyramid.to_dict(), "height": self.height,
                "width": self.width, "defaults": self.defaults.__dict__, "inference": self.inference}
        if self.interact is not None:
            meta["interact"] = self.interact.to_dict()
        (d / "model_index.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def random_tiny(cls, seed: int = 0, device=None, interact: Optional[InteractConfig] = None
                    ) -> "InfinityStarPipeline":
        """A tiny random-weight pipeline with the default model's shapes (64x64 frames, 8x8 latents, Shapes World
        vocabulary): it runs every code path, but its outputs are noise. For tests and demos. `interact` makes it
        an InfinityStar-Interact pipeline (e.g. InteractConfig(semantic_scale=2))."""
        from infinitystar.shapes.world import vocabulary
        from infinitystar.text.builtin import WordTextEncoder
        from infinitystar.tokenizer.video_vae import VideoVAE, VideoVAEConfig
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

    def to(self, device) -> "InfinityStarPipeline":
        """Move the pipeline to a device, keeping on the host what the memory options keep there."""
        device = torch.device(device)
        if self._offload is not None:
            self._offload.remove()
        self._offload = place_transformer(self.transformer, device, self.memory)
        self.tokenizer.to(device)
        place_text_encoder(self.text_encoder, device, self.memory)
        return self

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
        """One item (path or array) for every sample, or a list / stacked array of `batch` items."""
        items = media if isinstance(media, (list, tuple)) else [media]
        items = [load(m) if isinstance(m, (str, Path)) else np.asarray(m) for m in items]
        if len(items) == 1 and items[0].ndim == ndim + 1:
            items = list(items[0])
        if len(items) == 1:
            items = items * batch
        if len(items) != batch:
            raise ValueError(f"{len(items)} {what}s given for {batch} prompts")
        if any(m.shape != items[0].shape for m in items):
            raise ValueError(f"every {what} must have the same shape")
        return np.stack(items)

    def _prefix(self, schedule, image, video, batch: int) -> list[torch.Tensor]:
        """Teacher bits of the given first frame (image-to-video) or frames (continuation)."""
        from infinitystar.media import load_image, load_video
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
        Batch size 1. See `infinitystar.pipelines.stream` for what each kind keeps between calls.
        """
        return streaming.start(self, prompt, inference=inference, image=image, video=video,
                               guidance_scale=guidance_scale, temperature=temperature, generator=generator)

    @torch.no_grad()
    def __call__(self, prompt: PromptInput, num_frames: int = 17, image=None, video=None,
                 guidance_scale: Optional[float] = None, temperature: Optional[float] = None,
                 generator: Optional[torch.Generator] = None, progress: bool = False) -> PipelineOutput:
        """Generate frames.

        prompt: a text, a list of texts (a batch), or a list of per-clip text lists (a long video whose prompt
        changes: clip k uses the k-th text, the first frame the first). num_frames: 1 (an image) or 1 + 4k.
        image: the first frame (image-to-video); video: frames to continue (a path or an array, one for every
        sample or a list with one per prompt). temperature overrides both
        the image and the video temperatures.
        """
        t0 = time.perf_counter()
        grid = self._prompt_grid(prompt)
        if self.interact is not None:
            return self._interact_video(grid, num_frames, image, video, guidance_scale, temperature, generator, t0)
        schedule = self.pyramid.build(num_frames)
        d = self.defaults
        cfg_scale = d.guidance_scale if guidance_scale is None else float(guidance_scale)
        tau = [d.tau_image if s.clip == 0 else d.tau_video for s in schedule.scales]
        if temperature is not None:
            if temperature <= 0:
                raise ValueError(f"temperature must be positive, got {temperature}")
            tau = [float(temperature)] * len(tau)
        mem = self.memory
        captions = []
        with text_encoder_running(self.text_encoder, self.device, mem):
            for k in range(len(grid[0])):
                feats, mask = self.text_encoder.encode([seg[k] for seg in grid], self.device)
                captions.append(Caption(feats, mask))
        caption_of_clip = [0] + [min(c - 1, len(captions) - 1) for c in range(1, schedule.num_clips)]
        prefix = self._prefix(schedule, image, video, len(grid))
        t1 = time.perf_counter()
        self.transformer.set_token_chunk(mem.token_chunk)
        out = generate(self.transformer, schedule, captions, caption_of_clip=caption_of_clip,
                       guidance_scale=cfg_scale, guidance=d.guidance, apg_norm_threshold=d.apg_norm_threshold,
                       tau=tau, generator=generator, prefix_bits=prefix, progress=progress)
        t2 = time.perf_counter()
        tiles = {} if mem.vae_tile is None else {"tile": mem.vae_tile, "tile_overlap": mem.vae_tile_overlap}
        frames = streaming.to_frames(self.tokenizer.decode(out.codes, **tiles))
        t3 = time.perf_counter()
        return PipelineOutput([f for f in frames], out.codes,
                              {"encode_s": t1 - t0, "generate_s": t2 - t1, "decode_s": t3 - t2, "total_s": t3 - t0})

    def _interact_video(self, grid, num_frames, image, video, guidance_scale, temperature, generator,
                        t0) -> PipelineOutput:
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
        return PipelineOutput(frames, torch.cat(codes), {"total_s": time.perf_counter() - t0})
