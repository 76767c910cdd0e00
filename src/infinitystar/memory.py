"""Memory options of generation: what lives on the accelerator, when, and in what pieces.

`MemoryOptions` is one pipeline argument (`InfinityStarPipeline(..., memory=...)`, `from_pretrained(memory=...)`)
and one CLI flag per field (`infinitystar generate` / `plan`). Each option changes where and in which pieces the
same numbers are computed, never which numbers (token chunks and VAE chunks give the plain results up to float
rounding, the offloads bit for bit; VAE tiling differs near tile seams, within the tolerance the tests state):

* text_encoder: "device" keeps the text encoder on the accelerator; "offload" keeps it on the host and moves it to
  the accelerator only while it encodes; "cpu" runs it on the host (its features are moved).
* token_chunk: KV-cached transformer passes over more tokens run their attention queries and MLP in chunks of
  that many tokens (the MLP's hidden activations of the largest scales are the biggest temporaries).
* vae_chunk: latent frames per video VAE decoder chunk (the decoder runs chunk by chunk in time, its causal
  convolutions carrying their last frames across): 1, the default, needs about 0.6x the activations of the
  official plan's 2 (whose first chunk decodes 9 frames at once).
* vae_tile / vae_tile_overlap: decode in overlapping spatial tiles of at most that many latent cells.
* offload_for_decode: while the VAE decodes, the transformer (and a text encoder kept on the device) wait on the
  host; they come back when the decode is done (two copies of their weights over the host link per call).
* sequential_offload: the transformer blocks live on the host; each is copied to the accelerator for its forward
  pass and dropped after it (the weights then cost one block of accelerator memory; every step moves all of them).

Weight precision is chosen when loading (`from_pretrained(torch_dtype=...)`, `generate --dtype`), not here.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterable, Optional, Union

import torch
from torch import nn

TEXT_ENCODER_PLACEMENTS = ("device", "offload", "cpu")


@dataclass
class MemoryOptions:
    """The defaults are exact (the same numbers up to float rounding) and cost little time: the text encoder waits
    on the host, passes over more than 8192 tokens run in chunks, and the VAE decodes one latent frame (4 video
    frames) at a time. VAE tiles and the offloads are opt-in."""
    text_encoder: str = "offload"
    token_chunk: Optional[int] = 8192
    vae_chunk: int = 1
    vae_tile: Optional[int] = None
    vae_tile_overlap: int = 4
    offload_for_decode: bool = False
    sequential_offload: bool = False
    offload_device: str = "cpu"

    def __post_init__(self):
        if self.text_encoder not in TEXT_ENCODER_PLACEMENTS:
            raise ValueError(f"text_encoder must be one of {', '.join(TEXT_ENCODER_PLACEMENTS)}, "
                             f"got {self.text_encoder!r}")
        if self.token_chunk is not None and int(self.token_chunk) < 1:
            raise ValueError(f"token_chunk must be a positive number of tokens, got {self.token_chunk}")
        if isinstance(self.vae_chunk, bool) or not isinstance(self.vae_chunk, int) or self.vae_chunk < 1:
            raise ValueError(f"vae_chunk must be a positive number of latent frames, got {self.vae_chunk!r}")
        if self.vae_tile is not None and not 0 <= self.vae_tile_overlap < self.vae_tile:
            raise ValueError(f"vae_tile ({self.vae_tile}) must be larger than vae_tile_overlap "
                             f"({self.vae_tile_overlap}) >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        parts = []
        if self.text_encoder != "device":
            parts.append(f"text encoder {self.text_encoder}")
        if self.token_chunk:
            parts.append(f"token chunks {self.token_chunk}")
        parts.append(f"VAE chunks of {self.vae_chunk} latent frame{'s' if self.vae_chunk > 1 else ''}")
        if self.vae_tile:
            parts.append(f"VAE tiles {self.vae_tile} (overlap {self.vae_tile_overlap})")
        if self.offload_for_decode:
            parts.append("offload for decode")
        if self.sequential_offload:
            parts.append("sequential offload")
        return ", ".join(parts)


def add_memory_flags(parser) -> None:
    """The memory options as command-line flags (`infinitystar generate`, `infinitystar plan`)."""
    d = MemoryOptions()
    g = parser.add_argument_group("memory options")
    g.add_argument("--text-encoder", choices=TEXT_ENCODER_PLACEMENTS, default=d.text_encoder,
                   help="device: keep it on the accelerator; offload: on the host, visiting the accelerator only to "
                        f"encode; cpu: run it on the host (default {d.text_encoder})")
    g.add_argument("--token-chunk", type=int, default=d.token_chunk, metavar="N",
                   help=f"run attention queries and MLP of larger scales in chunks of N tokens; 0: one pass "
                        f"(default {d.token_chunk})")
    g.add_argument("--vae-chunk", type=int, default=d.vae_chunk, metavar="LATENTS",
                   help="latent frames per VAE decoder chunk (4 video frames each); the same frames whatever the "
                        f"size, the activations grow with it (default {d.vae_chunk}; 2 is the official plan)")
    g.add_argument("--vae-tile", type=int, default=d.vae_tile, metavar="CELLS",
                   help="decode in overlapping spatial tiles of at most CELLS latent cells (16 px each for the video "
                        "VAE); off by default")
    g.add_argument("--vae-tile-overlap", type=int, default=d.vae_tile_overlap, metavar="CELLS",
                   help=f"latent cells shared by neighbouring tiles (default {d.vae_tile_overlap})")
    g.add_argument("--offload-for-decode", action="store_true",
                   help="move the transformer (and a text encoder kept on the accelerator) to the host while the VAE "
                        "decodes, and back after it")
    g.add_argument("--sequential-offload", action="store_true",
                   help="keep the transformer blocks on the host and copy each to the accelerator for its pass")


def memory_from_args(args) -> MemoryOptions:
    return MemoryOptions(text_encoder=args.text_encoder, token_chunk=args.token_chunk or None,
                         vae_chunk=args.vae_chunk, vae_tile=args.vae_tile or None,
                         vae_tile_overlap=args.vae_tile_overlap, offload_for_decode=args.offload_for_decode,
                         sequential_offload=args.sequential_offload)


def home_devices(device, options: MemoryOptions) -> dict[str, torch.device]:
    """Where each part of a pipeline lives between calls: "transformer" (its blocks), "text_encoder", "tokenizer"."""
    device, host = torch.device(device), host_device(options)
    return {"transformer": host if options.sequential_offload else device,
            "text_encoder": device if options.text_encoder == "device" else host, "tokenizer": device}


def host_device(options: MemoryOptions) -> torch.device:
    return torch.device(options.offload_device)


def _to_host(t: torch.Tensor, host: torch.device, device: torch.device) -> torch.Tensor:
    t = t.to(host)
    if device.type == "cuda" and host.type == "cpu":
        t = t.pin_memory()        # pinned pages make the per-block copies asynchronous and faster
    return t


class SequentialOffload:
    """Keep modules' parameters and buffers on the host; copy each module's tensors to `device` just before its
    forward and put the host tensors back right after (the device copies are then freed). Remove with `remove()`
    (the modules then stay on the host). For inference: the swapped-in parameters do not require gradients."""

    def __init__(self, modules: Iterable[nn.Module], device: Union[str, torch.device],
                 host: Union[str, torch.device] = "cpu"):
        self.device, self.host = torch.device(device), torch.device(host)
        self.modules = list(modules)
        self._handles = []
        self._host: dict[int, list] = {}
        for m in self.modules:
            slots = _slots(m)
            self._host[id(m)] = [(owner, kind, name, _wrap(kind, _to_host(t.detach(), self.host, self.device)))
                                 for owner, kind, name, t in slots]
            self._restore(m)
            self._handles.append(m.register_forward_pre_hook(self._load))
            self._handles.append(m.register_forward_hook(self._unload))

    def _restore(self, module: nn.Module) -> None:
        for owner, kind, name, t in self._host[id(module)]:
            getattr(owner, kind)[name] = t

    def _load(self, module: nn.Module, args) -> None:
        for owner, kind, name, t in self._host[id(module)]:
            getattr(owner, kind)[name] = _wrap(kind, t.detach().to(self.device, non_blocking=True))

    def _unload(self, module: nn.Module, args, output) -> None:
        self._restore(module)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _slots(module: nn.Module) -> list:
    return [(owner, kind, name, t) for owner in module.modules() for kind in ("_parameters", "_buffers")
            for name, t in getattr(owner, kind).items() if t is not None]


def _wrap(kind: str, t: torch.Tensor) -> torch.Tensor:
    return nn.Parameter(t, requires_grad=False) if kind == "_parameters" else t


def place_transformer(transformer: nn.Module, device, options: MemoryOptions) -> Optional[SequentialOffload]:
    """Put a transformer on `device`; with sequential offload only its non-block parts (embeddings, heads), the
    blocks staying on the host behind per-block hooks (returned)."""
    device = torch.device(device)
    if not options.sequential_offload:
        transformer.to(device)
        return None
    for *_, t in _resident_slots(transformer, options):
        t.data = t.data.to(device)
    return SequentialOffload(transformer.blocks, device, host_device(options))


def _resident_slots(transformer: nn.Module, options: MemoryOptions) -> list:
    """The parameter and buffer slots of a transformer that live on the accelerator: all of them, or under
    sequential offload those outside its blocks."""
    if not options.sequential_offload:
        return _slots(transformer)
    blocks = set(id(b) for b in transformer.blocks)
    own = [(transformer, kind, name, t) for kind in ("_parameters", "_buffers")
           for name, t in getattr(transformer, kind).items() if t is not None]
    return own + [slot for name, child in transformer.named_children() if name != "blocks" and id(child) not in blocks
                  for slot in _slots(child)]


def place_text_encoder(encoder: nn.Module, device, options: MemoryOptions) -> None:
    """Where the text encoder waits between prompts: the device ("device"), else the host."""
    encoder.to(torch.device(device) if options.text_encoder == "device" else host_device(options))


@contextlib.contextmanager
def text_encoder_running(encoder: nn.Module, device, options: MemoryOptions):
    """While encoding: "offload" brings the encoder to the device and sends it back to the host afterwards."""
    if options.text_encoder != "offload":
        yield
        return
    encoder.to(torch.device(device))
    try:
        yield
    finally:
        encoder.to(host_device(options))


class DecodeOffload:
    """`offload_for_decode`: while the VAE decodes, the transformer's weights that live on the accelerator (all, or
    under sequential offload those outside its blocks) and a text encoder kept there wait on the host, and come
    back afterwards. Parameters keep their identity (their `.data` moves). The host copies are kept for the next
    call (pinned when the accelerator is CUDA), so later calls copy into them without allocating."""

    def __init__(self):
        self._host: dict[int, torch.Tensor] = {}

    @contextlib.contextmanager
    def __call__(self, transformer: nn.Module, text_encoder: nn.Module, device, options: MemoryOptions):
        device, host = torch.device(device), host_device(options)
        if not options.offload_for_decode or device == host:
            self._host = {}            # host copies are kept only while the option is on
            yield
            return
        slots = _resident_slots(transformer, options)
        if options.text_encoder == "device":
            slots += _slots(text_encoder)
        resident = {id(t): t for *_, t in slots}
        kept, self._host = self._host, {}
        for key, t in resident.items():
            buf = kept.pop(key, None)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = _to_host(t.detach(), host, device)
            else:
                buf.copy_(t.detach(), non_blocking=True)
            self._host[key] = buf
            t.data = buf
        del kept                       # copies of what no longer lives on the device are let go
        try:
            yield
        finally:
            for key, t in resident.items():
                t.data = self._host[key].to(device, non_blocking=True)


__all__ = ["MemoryOptions", "DecodeOffload", "SequentialOffload", "place_transformer", "place_text_encoder",
           "text_encoder_running",
           "home_devices", "add_memory_flags", "memory_from_args", "TEXT_ENCODER_PLACEMENTS"]
