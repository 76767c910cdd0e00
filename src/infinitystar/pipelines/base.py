"""What both pipelines share, with diffusers' names and meaning where the concept exists.

- A model folder: `model_index.json` (the `family`, the pipeline's own fields, generation defaults, the model card's
  facts) and three component folders, `transformer/`, `tokenizer/` (the VAE) and `text_encoder/`.
  `read_model_index` reads it once; `Pipeline.from_pretrained` (and `infinitystar.pipelines.load`) load it from a
  folder, the shipped default model, or a Hugging Face Hub repo id (through `huggingface_hub` when installed),
  straight into `torch_dtype` on `device`. `save_pretrained` writes the folder and a model card (README.md).
- Call arguments: prompts times `num_*_per_prompt`, `negative_prompt`, `generator` (one, or one per output),
  `guidance_scale` / `guidance` (a `Guidance`: per-scale values, CFG or APG), `output_type`, `return_dict`,
  `callback_on_step_end` (stop with `pipe._interrupt = True`, as in diffusers), a progress bar
  (`set_progress_bar_config`), and `precision` ("auto" by default: bf16 autocast on CUDA and on CPUs with native
  bf16, else fp32; "fp32"; "bf16": the sampling loop and the decode).
- Placement: `memory` (`infinitystar.memory.MemoryOptions`) says where each part lives and in which pieces it runs;
  `from_pretrained` reads each part onto its home device and `to(device)` places the parts as it says.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

import torch
from PIL import Image
from tqdm.auto import tqdm

from infinitystar import __version__
from infinitystar.checkpoint_io import write_json, write_text
from infinitystar.memory import DecodeOffload, MemoryOptions, home_devices, place_text_encoder, place_transformer
from infinitystar.model.layers import PackedWeights
from infinitystar.runtime import PRECISIONS, UserError, precision_name, resolve_precision
from infinitystar.sampling.bits import StepInfo, check_generators
from infinitystar.sampling.guidance import Guidance
from infinitystar.text import load_text_encoder

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "weights" / "default"
INDEX_FILE = "model_index.json"
CARD_FILE = "README.md"
COMPONENTS = ("transformer", "tokenizer", "text_encoder")
OUTPUT_TYPES = ("np", "pil", "pt", "uint8", "codes")
PathOrRepo = Union[str, Path, None]
DtypeArg = Union[torch.dtype, dict, None]       # one dtype, or one per component (see `component_dtypes`)
Callback = Callable[["Pipeline", int, int, dict], Optional[dict]]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# --- the model folder ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelIndex:
    """A model folder's `model_index.json`, read once."""
    path: Path            # the folder
    family: str           # "infinitystar" or "infinity"
    data: dict

    def field(self, name: str, kind: type, default: Any = dataclasses.MISSING) -> Any:
        """A top-level field, type-checked, with an error naming the file."""
        if name not in self.data:
            if default is dataclasses.MISSING:
                raise ValueError(f"{self.path / INDEX_FILE}: missing field {name!r}")
            return default
        value = self.data[name]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise ValueError(f"{self.path / INDEX_FILE}: field {name!r} must be a {kind.__name__}, got "
                             f"{type(value).__name__} {value!r}")
        return value


def resolve_model_path(path_or_repo_id: PathOrRepo = None, *, revision: Optional[str] = None,
                       cache_dir: Union[str, Path, None] = None, local_files_only: bool = False) -> Path:
    """A model folder: None or "default" is the model shipped in the package; an existing path is itself; an
    "owner/name" that is no local path is a Hugging Face Hub repo id, resolved with `huggingface_hub` (its cache,
    downloading only what is missing unless `local_files_only`)."""
    if path_or_repo_id is None or path_or_repo_id == "default":
        return DEFAULT_MODEL_DIR
    path = Path(path_or_repo_id).expanduser()
    if path.exists() or not _REPO_ID.match(str(path_or_repo_id)):
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{path_or_repo_id}: no such folder (to load it as a Hugging Face Hub repo id, "
                                f"pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(str(path_or_repo_id), revision=revision, cache_dir=cache_dir,
                                      local_files_only=local_files_only, library_name="infinitystar",
                                      library_version=__version__))
    except Exception as e:  # offline, unknown repo, gated, incomplete cache: huggingface_hub raises many types
        raise FileNotFoundError(f"{path_or_repo_id}: no such folder, and not found on the Hugging Face Hub "
                                f"({type(e).__name__}: {e})") from None


def read_model_index(folder: Union[str, Path]) -> ModelIndex:
    """`model_index.json` of a model folder (the family defaults to "infinitystar"), with one-line errors."""
    d = Path(folder)
    index = d / INDEX_FILE
    if not index.is_file():
        hint = " (the shipped default model is missing from this install)" if d == DEFAULT_MODEL_DIR else ""
        raise FileNotFoundError(f"{d}: not an infinitystar model folder, no {INDEX_FILE}{hint}")
    try:
        data = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{index}: unreadable model index ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{index}: expected a JSON object, found {type(data).__name__}")
    family = data.get("family", "infinitystar")
    if family not in _PIPELINES:
        raise ValueError(f"{index}: unknown family {family!r}; known: {', '.join(_PIPELINES)}")
    return ModelIndex(d, family, data)


@dataclass
class ModelCard:
    """Facts for the model card (README.md) that `save_pretrained` writes, kept in model_index.json."""
    source: str = "not recorded"
    license: str = "not recorded"
    parity: str = "not recorded"
    notes: str = ""

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "ModelCard":
        if not isinstance(d, dict) or not all(isinstance(v, str) for v in d.values()):
            raise ValueError(f"{where}: field 'card' must map names to texts")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{where}: card: unknown field(s) {', '.join(unknown)}")
        return cls(**d)


@dataclass
class GuidanceDefaults:
    """The guidance part of a model's generation defaults (model_index.json "defaults")."""
    guidance_scale: Union[float, list[float]] = 3.0     # one number, or one per scale
    guidance: str = "cfg"                               # "cfg", "cfg_prob" or "apg"
    apg_eta: float = 0.0
    apg_norm_threshold: float = 0.05

    def __post_init__(self):
        self.guidance_config()    # validates

    def guidance_config(self, scale: Union[float, Sequence[float], None] = None) -> Guidance:
        return Guidance(self.guidance_scale if scale is None else scale, self.guidance, self.apg_eta,
                        self.apg_norm_threshold)

    @classmethod
    def from_dict(cls, d: dict, where: str = "model_index.json defaults"):
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None


def component_dtypes(torch_dtype: DtypeArg) -> dict[str, Optional[torch.dtype]]:
    """The load dtype of each component: one dtype for all, or a dict by component name with "default" for the
    rest (diffusers' convention); None keeps a component's own default."""
    if not isinstance(torch_dtype, dict):
        return dict.fromkeys(COMPONENTS, torch_dtype)
    unknown = sorted(set(torch_dtype) - {*COMPONENTS, "default"})
    if unknown:
        raise ValueError(f"torch_dtype: unknown component(s) {', '.join(unknown)}; use "
                         f"{', '.join(COMPONENTS)} or 'default'")
    bad = [k for k, v in torch_dtype.items() if v is not None and not isinstance(v, torch.dtype)]
    if bad:
        raise ValueError(f"torch_dtype: {', '.join(bad)} must be a torch.dtype")
    return {name: torch_dtype.get(name, torch_dtype.get("default")) for name in COMPONENTS}


# --- outputs ---------------------------------------------------------------------------------------------------------
class _Output:
    """diffusers' BaseOutput behaviour: `out[0]` is the first field (frames or images)."""

    def to_tuple(self) -> tuple:
        return (getattr(self, dataclasses.fields(self)[0].name),)

    def __getitem__(self, i):
        return self.to_tuple()[i]


@dataclass
class VideoPipelineOutput(_Output):
    """frames: per `output_type`: "np" (B, T, H, W, 3) float32 in [0, 1]; "uint8" the same in uint8; "pt" a
    (B, T, 3, H, W) float tensor in [0, 1]; "pil" a list of lists of PIL images; "codes" the code maps.
    codes: (B, C, T_lat, h, w) latent code maps; bits: per step (B, t, h, w, bits) uint8."""
    frames: Any
    codes: torch.Tensor
    bits: list[torch.Tensor] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    precision: str = "fp32"

    @property
    def images(self):
        """The first frame of each sample (text-to-image with num_frames=1), in the same output type."""
        if self.frames is self.codes:
            raise ValueError("output_type 'codes' has no images")
        if isinstance(self.frames, list):
            return [f[0] for f in self.frames]
        return self.frames[:, 0]


@dataclass
class ImagePipelineOutput(_Output):
    """images: per `output_type`: "pil" a list of PIL images; "np" (B, H, W, 3) float32 in [0, 1]; "uint8" the
    same in uint8; "pt" a (B, 3, H, W) float tensor in [0, 1]; "codes" the code maps. codes: (B, d, h, w)."""
    images: Any
    codes: torch.Tensor
    bits: list[torch.Tensor] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    precision: str = "fp32"


def postprocess(pixels: torch.Tensor, output_type: str, truncate: bool = False):
    """(B, [T,] 3, H, W) float in [0, 1] -> the requested output type (channels last for "np", "uint8", "pil").
    uint8 values are x * 255 rounded, or truncated (`truncate`, as the Infinity reference does)."""
    if output_type == "pt":
        return pixels
    last = pixels.movedim(-3, -1).cpu()
    if output_type == "np":
        return last.numpy()
    scaled = last * 255
    u8 = (scaled if truncate else scaled.round()).to(torch.uint8).numpy()
    if output_type == "uint8":
        return u8
    if u8.ndim == 4:
        return [Image.fromarray(x) for x in u8]
    return [[Image.fromarray(x) for x in video] for video in u8]


# --- the pipeline ----------------------------------------------------------------------------------------------------
class Pipeline:
    """The base of `InfinityStarPipeline` and `InfinityPipeline`. A subclass names its family, component classes
    and output type, reads its own index fields (`_read_index`) and writes them (`index_fields`)."""

    family: ClassVar[str]
    transformer_class: ClassVar[type]
    tokenizer_class: ClassVar[type]
    default_output_type: ClassVar[str]

    def __init__(self, transformer, tokenizer, text_encoder, defaults, card: Optional[ModelCard] = None,
                 precision: str = "auto", memory: Optional[MemoryOptions] = None):
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.defaults = defaults
        self.card = card or ModelCard()
        if precision not in PRECISIONS:
            raise UserError(f"precision {precision!r} is not supported; choose one of {', '.join(PRECISIONS)}")
        self.precision = precision
        self.memory = memory or MemoryOptions()
        self._offload = None         # the SequentialOffload hooks while the transformer blocks wait on the host
        # the transformer's linear weights packed for oneDNN on the CPU, kept across calls (one more copy of the
        # block weights; see model/layers.py)
        self.packed_weights = PackedWeights()
        self._decode_offload = DecodeOffload()     # the host copies of `memory.offload_for_decode`
        self._progress_bar_config: dict = {}
        self._interrupt = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "family" in cls.__dict__:
            _PIPELINES[cls.family] = cls

    @property
    def components(self) -> dict:
        return {"transformer": self.transformer, "tokenizer": self.tokenizer, "text_encoder": self.text_encoder}

    @property
    def device(self) -> torch.device:
        """Where the pipeline computes (the transformer's embedding, which stays there under sequential offload)."""
        return self.transformer.word_embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.word_embed.weight.dtype

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` in `callback_on_step_end` to stop a generation (as in diffusers)."""
        return self._interrupt

    def to(self, *args, **kwargs) -> "Pipeline":
        """Move the components: `to("cuda")`, `to(torch.bfloat16)`, `to("cuda", torch.bfloat16)`,
        `to(device=..., dtype=...)` (as diffusers). On a device, the memory options decide what stays on the host
        (the text encoder between prompts, the transformer blocks under sequential offload)."""
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        if kwargs:
            raise TypeError(f"unexpected argument(s) {', '.join(kwargs)}")
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            else:
                device = a
        if self._offload is not None:       # put the blocks back in place before converting or moving them
            self._offload.remove()
            self._offload = None
            device = self.device if device is None else device
        self.packed_weights = PackedWeights()
        if dtype is not None:
            for m in self.components.values():
                m.to(dtype=dtype)
        if device is not None:
            device = torch.device(device)
            self._offload = place_transformer(self.transformer, device, self.memory)
            self.tokenizer.to(device)
            place_text_encoder(self.text_encoder, device, self.memory)
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        """Options of the tqdm progress bar shown while generating (`disable=True` turns it off)."""
        self._progress_bar_config = dict(kwargs)

    def progress_bar(self, total: int) -> tqdm:
        return tqdm(total=total, **{"desc": "generating", "unit": "step", "leave": False,
                                    **self._progress_bar_config})

    # --- persistence ------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: PathOrRepo = None, *,
                        torch_dtype: DtypeArg = None, device=None, precision: str = "auto",
                        memory: Optional[MemoryOptions] = None, revision: Optional[str] = None,
                        cache_dir: Union[str, Path, None] = None, local_files_only: bool = False) -> "Pipeline":
        """Load a model folder (None: the model shipped in the package), a Hub repo id, straight into
        `torch_dtype` (None: float32; the T5 text encoder keeps its own default) on `device` (None: cpu), each part
        read onto the device where the memory options keep it. As in diffusers, `torch_dtype` may be a dict by
        component ("transformer", "tokenizer", "text_encoder", and "default" for the others), e.g.
        `{"transformer": torch.bfloat16}`: the 8B transformer read straight into bf16 (never an fp32 copy), the
        VAE in float32. precision: what sampling and decoding compute in ("auto": bf16 autocast on CUDA and on CPUs
        with native bf16, else fp32; "fp32"; "bf16"), apart from the weights' `torch_dtype`."""
        folder = resolve_model_path(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir,
                                    local_files_only=local_files_only)
        index = read_model_index(folder)
        if index.family != cls.family:
            raise ValueError(f"{folder} holds a {index.family!r} model; load it with "
                             f"{_PIPELINES[index.family].__name__} or infinitystar.pipelines.load")
        return cls._load(index, torch_dtype=torch_dtype, device=device, precision=precision, memory=memory)

    @classmethod
    def _load(cls, index: ModelIndex, *, torch_dtype: DtypeArg = None, device=None, precision: str = "auto",
              memory: Optional[MemoryOptions] = None) -> "Pipeline":
        """The folder's fields are checked before any weights are read."""
        d = index.path
        dtypes = component_dtypes(torch_dtype)
        fields = cls._read_index(index)
        card = ModelCard.from_dict(index.data["card"], str(d / INDEX_FILE)) if "card" in index.data else None
        for name in COMPONENTS:
            if not (d / name).is_dir():
                raise FileNotFoundError(f"{d}: incomplete model folder, no {name}/ (needs {', '.join(COMPONENTS)})")
        memory = memory or MemoryOptions()
        device = torch.device(device if device is not None else "cpu")
        home = home_devices(device, memory)
        pipe = cls(transformer=cls.transformer_class.from_pretrained(d / "transformer",
                                                                     torch_dtype=dtypes["transformer"],
                                                                     device=home["transformer"]),
                   tokenizer=cls.tokenizer_class.from_pretrained(d / "tokenizer", torch_dtype=dtypes["tokenizer"],
                                                                 device=home["tokenizer"]),
                   text_encoder=load_text_encoder(d / "text_encoder", torch_dtype=dtypes["text_encoder"],
                                                  device=home["text_encoder"]),
                   **fields, card=card, precision=precision, memory=memory)
        return pipe.to(device)

    @classmethod
    def _read_index(cls, index: ModelIndex) -> dict:
        """The constructor arguments the pipeline's own model_index.json fields give (validated)."""
        raise NotImplementedError

    def index_fields(self) -> dict:
        """The family's own model_index.json fields (its architecture: pyramid, size, ...); two models with equal
        fields and family differ only in their weights."""
        raise NotImplementedError

    def save_pretrained(self, save_directory: Union[str, Path]) -> Path:
        """Write the model folder: the three components, model_index.json and the model card (README.md)."""
        d = Path(save_directory)
        d.mkdir(parents=True, exist_ok=True)
        for name, module in self.components.items():
            module.save_pretrained(d / name)
        write_json(d / INDEX_FILE, index_data(self.family, self.index_fields(), self.defaults, self.card))
        write_text(d / CARD_FILE, self.model_card())
        return d

    def model_card(self) -> str:
        """The README.md of a saved folder: what it is, where it comes from, its licence and parity evidence."""
        rows = "\n".join(f"| `{n}/` | {type(m).__name__} | {sum(p.numel() for p in m.parameters()) / 1e6:.2f} M |"
                         for n, m in self.components.items())
        return render_card(self.family, f"{type(self).__name__} model folder", self.card,
                           f"| folder | module | parameters |\n|---|---|---|\n{rows}\n\n")

    # --- call helpers -----------------------------------------------------------------------------------------------
    @staticmethod
    def _texts(value, what: str) -> list[str]:
        texts = [value] if isinstance(value, str) else list(value or [])
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise ValueError(f"empty {what}: give a non-empty text (or a list of them)")
        return texts

    def _negatives(self, negative_prompt, n_prompts: int, per_prompt: int) -> Optional[list[str]]:
        """One negative text per output (a single one applies to every prompt)."""
        if negative_prompt is None:
            return None
        negs = self._texts(negative_prompt, "negative prompt")
        if len(negs) == 1:
            negs = negs * n_prompts
        if len(negs) != n_prompts:
            raise ValueError(f"{len(negs)} negative prompts given for {n_prompts} prompts")
        return [n for n in negs for _ in range(per_prompt)]

    @staticmethod
    def _check_call(per_prompt: int, output_type: str, what: str) -> None:
        if not isinstance(per_prompt, int) or isinstance(per_prompt, bool) or per_prompt < 1:
            raise ValueError(f"{what} must be a positive integer, got {per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; choose one of {', '.join(OUTPUT_TYPES)}")

    def _guidance(self, guidance_scale, guidance: Optional[Guidance]) -> Guidance:
        """The call's guidance: `guidance` (or the model's default), with `guidance_scale` as its scale if given."""
        g = guidance if guidance is not None else self.defaults.guidance_config()
        return g if guidance_scale is None else dataclasses.replace(g, scale=guidance_scale)

    def compute_dtype(self, precision: Optional[str] = None) -> torch.dtype:
        """The dtype sampling and decoding compute in: `precision` ("auto", "fp32", "bf16"; None: the pipeline's
        own) resolved for the pipeline's device (`runtime.resolve_precision`)."""
        return resolve_precision(self.precision if precision is None else precision, self.device)

    def _run(self, sample: Callable, decode: Callable, batch: int, generator, num_steps: int,
             callback_on_step_end: Optional[Callback], precision: Optional[str], output_type: str):
        """Sample (with the progress bar and the callback) and decode (the caller runs without autograd; with
        `memory.offload_for_decode` the transformer waits on the host meanwhile), both in the resolved precision
        (passed to `sample(on_step, dtype)` and `decode(codes, dtype)`); returns (sampler output, decoded pixels in
        [0, 1] or None for "codes", the precision name)."""
        check_generators(generator, batch)
        dtype = self.compute_dtype(precision)
        self._interrupt = False
        with self.progress_bar(num_steps) as bar:
            def on_step(info: StepInfo) -> bool:
                bar.update(1)
                if callback_on_step_end is not None:
                    callback_on_step_end(self, info.step, info.scale, {
                        "clip": info.clip, "shape": info.shape, "bits": info.bits, "forced": info.forced,
                        "num_steps": info.num_steps})
                return self._interrupt
            out = sample(on_step, dtype)
            pixels = None
            if output_type != "codes":
                with self._decode_offload(self.transformer, self.text_encoder, self.device, self.memory):
                    pixels = decode(out.codes, dtype)
        return out, pixels, precision_name(dtype)


def _yaml_license(text: str) -> str:
    """The licence identifier for the card's metadata ("other" unless the text starts with a plain id)."""
    first = text.split()[0].lower() if text.split() else ""
    return first if re.fullmatch(r"[a-z0-9.\-]+", first) and first not in ("not", "see") else "other"


def index_data(family: str, fields: dict, defaults, card: ModelCard) -> dict:
    """The content of model_index.json (as diffusers: the class name and the version that wrote it)."""
    return {"family": family, "_class_name": _PIPELINES[family].__name__, "_infinitystar_version": __version__,
            **fields, "defaults": dataclasses.asdict(defaults), "card": dataclasses.asdict(card)}


def render_card(family: str, title: str, card: ModelCard, body: str = "") -> str:
    """A model card (README.md, Hugging Face metadata first): how to load the folder, its source, licence, the
    version that wrote it and the parity evidence."""
    cls = _PIPELINES[family].__name__
    tag = "text-to-video" if family == "infinitystar" else "text-to-image"
    return (f"---\nlibrary_name: infinitystar\nlicense: {_yaml_license(card.license)}\npipeline_tag: {tag}\n"
            f"tags:\n- {family}\n- bitwise-autoregressive\n---\n\n# {title}\n\n"
            f"Load it with the `infinitystar` package: `{cls}.from_pretrained(\"<this folder>\")` or "
            f"`infinitystar generate --model <this folder>`.\n\n{body}"
            f"- **Source:** {card.source}\n- **Licence:** {card.license}\n"
            f"- **Written by:** infinitystar {__version__}\n- **Parity evidence:** {card.parity}\n"
            + (f"\n{card.notes}\n" if card.notes else ""))


_PIPELINES: dict[str, type] = {}


def load(pretrained_model_name_or_path: Union[PathOrRepo, ModelIndex] = None, **kwargs) -> Pipeline:
    """The pipeline of any model folder (or Hub repo id, or an already read `ModelIndex`): its model_index.json is
    read once and names the family. kwargs as `Pipeline.from_pretrained`."""
    hub = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "local_files_only") if k in kwargs}
    index = pretrained_model_name_or_path
    if not isinstance(index, ModelIndex):
        index = read_model_index(resolve_model_path(index, **hub))
    return _PIPELINES[index.family]._load(index, **kwargs)


__all__ = ["Pipeline", "ModelIndex", "ModelCard", "GuidanceDefaults", "VideoPipelineOutput", "ImagePipelineOutput",
           "read_model_index", "resolve_model_path", "load", "component_dtypes", "DEFAULT_MODEL_DIR", "OUTPUT_TYPES"]
