"""One validated config file per training run (YAML or TOML) -> typed dataclasses.

Every key is checked: an unknown key or a value of the wrong type is a `ConfigError` that names the dotted key
(e.g. `optim.lr: expected a number, got 'fast'`). The `model` and `pyramid` sections take a preset name plus any
field of `TransformerConfig` / `PyramidConfig` as an override, validated against those dataclasses' types.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Optional, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

from infinitystar.model.infinitystar import TRANSFORMER_PRESETS, TransformerConfig
from infinitystar.quant.interact import InteractConfig
from infinitystar.runtime import SEED_MAX, read_utf8
from infinitystar.schedules.pyramid import PYRAMID_PRESETS, PyramidConfig


class ConfigError(ValueError):
    """A training config key is unknown, ill-typed or out of range."""


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------

def build_preset(config_cls, presets: dict[str, dict], preset: Optional[str], overrides: dict, where: str):
    """An architecture config from a preset (or none) plus field overrides; its own errors named by `where`."""
    try:
        return config_cls(**{**(presets[preset] if preset is not None else {}), **overrides})
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


@dataclass
class ModelSection:
    """The transformer: a preset plus overrides of `TransformerConfig` fields, or a folder to fine-tune from."""
    preset: Optional[str] = "tiny"
    init_from: Optional[str] = None        # folder with config.json + model.safetensors (fine-tuning)
    overrides: dict = field(default_factory=dict)

    def build(self) -> TransformerConfig:
        if self.init_from is not None:
            cfg_path = Path(self.init_from) / "config.json"
            if not cfg_path.is_file():
                raise ConfigError(f"model.init_from: {cfg_path} does not exist")
            raw = json.loads(cfg_path.read_text())
            return TransformerConfig.from_dict(raw)
        return build_preset(TransformerConfig, TRANSFORMER_PRESETS, self.preset, self.overrides, "model")


@dataclass
class PyramidSection:
    """The spacetime pyramid: a preset plus overrides of `PyramidConfig` fields."""
    preset: Optional[str] = "tiny"
    overrides: dict = field(default_factory=dict)

    def build(self) -> PyramidConfig:
        return build_preset(PyramidConfig, PYRAMID_PRESETS, self.preset, self.overrides, "pyramid")


@dataclass
class ComponentSection:
    """A component loaded from a folder (text encoder or video tokenizer). Frozen unless `trainable` (only the
    built-in text encoder can be trained, jointly with the transformer, as the default model is)."""
    path: Optional[str] = None
    trainable: bool = False


@dataclass
class DataConfig:
    manifests: list[str] = field(default_factory=list)   # JSONL files or folders of them (searched recursively)
    latent_cache: Optional[str] = None   # folder written by `extract_features`; read first when set
    require_cache: bool = False          # True: a sample without a cached latent is skipped, never encoded
    cache_write: bool = True             # a sample encoded in training is written to latent_cache (when no file of
                                         # it is there), so a run without `extract_features` fills the cache as it goes
    pixels_per_latent: int = 16          # tokenizer spatial stride (16 official VAE; 8 for 64x64 -> 8x8 tests)
    fps: Optional[float] = 16.0          # resample videos to this rate (None: take the source frames one by one)
    max_frames: int = 81                 # longest video fed to training, 1 + k * temporal_compression
    duration_unit_frames: Optional[int] = None   # durations are cut to 1 + k * unit frames; None: a whole clip
    video_caption_fields: list[str] = field(
        default_factory=lambda: ["tarsier2_caption", "MiniCPM_V_2_6_caption", "caption"])
    image_caption_fields: list[str] = field(default_factory=lambda: ["text", "long_caption"])
    short_caption_prob: float = 0.0      # keep only the first k ~ U{1..n} sentences with this probability
    duration_prefix: bool = False        # prepend "<<<t={seconds}s>>> " to video captions (official option)
    # a video with a caption per segment: its first frame reads every segment's caption (where it starts must leave
    # room for the whole captioned path), its clips their own; off in the official layout
    first_frame_all_captions: bool = False
    shuffle: bool = True
    num_workers: int = 2                 # decoding threads (0: decode inline)


@dataclass
class ScaleSubsetConfig:
    """Which scales of a sample are packed (the rest are only computed to build the residual inputs).

    mode "all": every scale. mode "random": draw a number of clips k (weights `clip_weights[k-1]`, truncated to
    the sample's clips and renormalised; None = uniform), then a prefix of the last kept clip's scales of
    length m ~ U{min_last_scales..N}. Earlier clips contribute all their scales with probability
    `earlier_full_prob`, otherwise only what attention needs. Whatever is drawn, the reference scales that a
    selected scale attends to are always added, and only scales that exist in the sample are ever indexed.
    """
    mode: Literal["all", "random"] = "all"
    clip_weights: Optional[list[float]] = None
    min_last_scales: int = 1
    earlier_full_prob: float = 1.0


@dataclass
class OptimConfig:
    lr: float = 4e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.97])
    eps: float = 1e-8
    weight_decay: float = 0.0            # applied to matrices only (not biases, norms or the null text)
    warmup_steps: int = 0                # linear warm-up from 0
    decay: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.0            # lr at max_steps / lr for cosine and linear decay
    # the step where warm-up and decay begin: > 0 restarts the schedule of a resumed run there (a new stage with
    # its own warm-up and decay to max_steps), 0 = from the first step
    start_step: int = 0
    grad_clip: float = 5.0               # global gradient norm; 0 disables clipping


@dataclass
class TrainBase:
    """What the `train` section of every trainer has."""
    max_steps: int = 100
    # auto: bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX), fp32 elsewhere
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    threads: Optional[int] = None        # torch.set_num_threads for this process (None: leave as is)


@dataclass
class TrainSection(TrainBase):
    micro_batch: int = 1                 # samples per rank per micro-step, packed into one sequence
    grad_accum: int = 1                  # micro-steps per optimizer step
    activation_checkpointing: bool = False
    # the blocks' work around attention under torch.compile (needs a C++ compiler on the CPU; without one, or
    # when compiling fails, one warning and eager steps): ~1.1x faster CPU steps after ~10-30 s of compiling per
    # process, plus a recompile for each new power-of-two range of packed lengths
    compile: bool = False
    ema_decay: Optional[float] = None    # None: no EMA; else an EMA of the weights updated every optimizer step
    # how the packed attention runs (model/attention.py): auto = flex on CUDA, grouped SDPA elsewhere; sdpa =
    # one SDPA with the dense segment mask (for comparison)
    attention_backend: Literal["auto", "grouped", "sdpa", "flex"] = "auto"
    parallel: Literal["fsdp", "ddp"] = "fsdp"   # with world_size > 1
    repetition: Literal["random", "last"] = "random"
    bsc_strength: float = 0.3            # bitwise self-correction: flip prob ~ U{0, .01, ..., strength}; 0 = off
    text_dropout: float = 0.1            # probability that a sample's captions become the null text
    pad_multiple: int = 128
    reweight_by_scale: float = 4.0       # per-scale loss weight min(max_reweight, (Vmax/V)^(1/(1+k))) * V
    max_reweight: float = 40.0
    # bits within a scale: "uniform" (official) or "residual": each label bit's cross-entropy weighted by the
    # magnitude of the residual it quantizes (what a wrong sign costs the code map), normalised to mean 1 per scale
    bit_weighting: Literal["uniform", "residual"] = "uniform"
    # multiplies each video-clip scale's loss weight by its entry (by scale index within the clip; clips >= 1, the
    # image pyramid untouched), then renormalises: more loss on the steps where motion is decided (null: off)
    clip_scale_boost: Optional[list[float]] = None
    # the same for the first frame's steps of a video sample (images untouched): where a video's start position is
    # decided, which must leave room for the prompted travel (null: off)
    first_frame_scale_boost: Optional[list[float]] = None
    focal_gamma: float = 0.0             # > 0: focal loss, each bit's term times (1 - p_true)^gamma
    scale_subset: ScaleSubsetConfig = field(default_factory=ScaleSubsetConfig)
    interact_first_segment: bool = True  # with `interact`: also pack the first clip in the text-to-video layout


@dataclass
class CheckpointConfig:
    every: int = 200                     # optimizer steps between checkpoints (0: only at the end)
    keep_last: int = 3                   # older complete checkpoints are deleted (0: keep all)
    save_optimizer: bool = True


@dataclass
class LogConfig:
    every: int = 10
    progress: bool = True                # tqdm bar on rank 0
    tensorboard: bool = False            # also write TensorBoard events when tensorboard is installed


SectionBuilder = Callable[[Any, str], Any]


class FileConfig:
    """A run config dataclass read from a file: `load` / `from_dict` validate (`build_config`, with the class's
    `sections` builders), `to_dict` / `to_yaml` write it back in the shape of the file (sections that are a
    preset plus `overrides`, such as model and pyramid, flattened)."""

    sections: ClassVar[dict[str, SectionBuilder]] = {}

    @classmethod
    def from_dict(cls, d: dict, overrides: Optional[Sequence[str]] = None):
        """Validate a raw mapping plus `key=value` overrides (values parsed as YAML)."""
        return build_config(cls, d, overrides, cls.sections)

    @classmethod
    def load(cls, path, overrides: Optional[Sequence[str]] = None):
        """Read and validate a `.yaml`/`.yml`, `.toml` or `.json` config file; errors name the file."""
        return load_file(cls, path, overrides, cls.sections)

    @classmethod
    def resolve(cls, config, overrides: Optional[Sequence[str]] = None):
        """A config file (plus overrides), or a config object (overrides applied to a copy)."""
        if isinstance(config, cls):
            return cls.from_dict(config.to_dict(), overrides) if overrides else config
        return cls.load(config, overrides)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for name, sec in out.items():
            if isinstance(sec, dict) and "overrides" in sec:
                out[name] = {k: v for k, v in sec.items() if k != "overrides"} | sec["overrides"]
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


def preset_section(section_cls, config_cls, presets: Sequence[str], default: Optional[str], *,
                   nullable_preset: bool = True, optional: bool = False, derived: Sequence[str] = (),
                   own: Sequence[str] = ()) -> SectionBuilder:
    """The builder of an architecture section `section_cls(preset=, overrides=)`: `preset` (one of `presets`, or
    null when `nullable_preset`) plus any field of `config_cls` as an override checked against its type. Fields in
    `derived` are set by the trainer from its other parts and may not be given. `own`: fields of the section itself
    (checked against its types), passed to it by name. `optional`: the whole section may be null (the architecture
    then comes from elsewhere, e.g. an init folder)."""
    def build(value: Any, where: str):
        if value is None and optional:
            return None
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        preset = _coerce(value.get("preset", default), Optional[str] if nullable_preset else str, f"{where}.preset")
        if preset is not None and preset not in presets:
            raise ConfigError(f"{where}.preset: unknown preset {preset!r}; choose one of {', '.join(presets)}"
                              + (" or null" if nullable_preset else ""))
        for k in value:
            if k in derived:
                raise ConfigError(f"{where}.{k}: set by the trainer from the parts it trains with; remove it")
        hints = get_type_hints(section_cls)
        mine = {k: _coerce(value[k], hints[k], f"{where}.{k}") for k in own if k in value}
        return section_cls(preset=preset, overrides=_validated_overrides(config_cls, value, where, {"preset", *own}),
                           **mine)
    return build


_transformer_section = preset_section(ModelSection, TransformerConfig, list(TRANSFORMER_PRESETS), "tiny",
                                      own=("init_from",))


def _model_section(value: Any, where: str) -> ModelSection:
    """A `TransformerConfig` preset plus overrides, or `init_from` a folder (whose config.json is the architecture)."""
    section = _transformer_section(value, where)
    if section.init_from is not None and section.overrides:
        raise ConfigError(f"{where}: init_from takes the architecture from its config.json; remove "
                          f"{', '.join(sorted(section.overrides))}")
    return section


_pyramid_section = preset_section(PyramidSection, PyramidConfig, list(PYRAMID_PRESETS), "tiny")


@dataclass
class RunConfig(FileConfig):
    """The generator's run."""
    sections: ClassVar[dict[str, SectionBuilder]] = {"model": _model_section, "pyramid": _pyramid_section}

    output_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"                 # auto: cuda:LOCAL_RANK when available, else cpu
    model: ModelSection = field(default_factory=ModelSection)
    pyramid: PyramidSection = field(default_factory=PyramidSection)
    text_encoder: ComponentSection = field(default_factory=ComponentSection)
    tokenizer: ComponentSection = field(default_factory=ComponentSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    interact: Optional[InteractConfig] = None   # set: train the interactive mode (InfinityStar-Interact)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Range checks that types cannot express; also builds the model and pyramid configs once."""
        t, d = self.train, self.data
        check_run(self)
        check_ranges(positive={"train.micro_batch": t.micro_batch, "train.grad_accum": t.grad_accum,
                               "train.pad_multiple": t.pad_multiple, "data.pixels_per_latent": d.pixels_per_latent,
                               "data.max_frames": d.max_frames},
                     non_negative={"data.num_workers": d.num_workers, "train.reweight_by_scale": t.reweight_by_scale,
                                   "train.focal_gamma": t.focal_gamma},
                     unit={"train.bsc_strength": t.bsc_strength, "train.text_dropout": t.text_dropout,
                           "data.short_caption_prob": d.short_caption_prob,
                           "train.scale_subset.earlier_full_prob": t.scale_subset.earlier_full_prob})
        check_ema_decay(t.ema_decay)
        if d.fps is not None and d.fps <= 0:
            raise ConfigError(f"data.fps must be positive or null, got {d.fps}")
        ss = t.scale_subset
        if ss.min_last_scales < 1:
            raise ConfigError(f"train.scale_subset.min_last_scales must be >= 1, got {ss.min_last_scales}")
        if ss.clip_weights is not None and (not ss.clip_weights or min(ss.clip_weights) < 0
                                            or sum(ss.clip_weights) <= 0):
            raise ConfigError(f"train.scale_subset.clip_weights must be non-negative with a positive sum, "
                              f"got {ss.clip_weights}")
        if self.tokenizer.trainable:
            raise ConfigError("tokenizer.trainable: the video tokenizer is trained by `infinitystar tokenizer "
                              "train`; the generator trainer keeps it frozen")
        model, pyramid = self.model.build(), self.pyramid.build()
        tc = pyramid.temporal_compression
        if (d.max_frames - 1) % tc:
            raise ConfigError(f"data.max_frames must be 1 + k * {tc} (the tokenizer's temporal compression), "
                              f"got {d.max_frames}")
        unit = d.duration_unit_frames
        if unit is not None and (unit <= 0 or unit % tc):
            raise ConfigError(f"data.duration_unit_frames must be a positive multiple of {tc}, got {unit}")
        if model.latent_channels != pyramid.detail_bits or model.semantic_bits != pyramid.semantic_bits:
            raise ConfigError(f"model bits ({model.semantic_bits}/{model.detail_bits}) do not match the pyramid's "
                              f"({pyramid.semantic_bits}/{pyramid.detail_bits})")
        if self.interact is not None:
            try:
                self.interact.check(pyramid)
            except ValueError as e:
                raise ConfigError(f"interact: {e}") from None
            two_clips = 1 + 2 * tc * pyramid.frames_per_clip
            if d.max_frames < two_clips:
                raise ConfigError(f"interact training needs videos of two clips: data.max_frames must be at least "
                                  f"{two_clips}, got {d.max_frames}")

    # --- convenience ------------------------------------------------------------------------------------------
    def duration_unit(self) -> int:
        p = self.pyramid.build()
        return self.data.duration_unit_frames or p.temporal_compression * p.frames_per_clip



# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------

def check_ema_decay(decay: Optional[float]) -> None:
    if decay is not None and not 0 < decay < 1:
        raise ConfigError(f"train.ema_decay must be in (0, 1) or null, got {decay}")


def _type_name(tp) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_type_name(get_args(tp)[0])}" if get_args(tp) else "a list"
    if tp is type(None):
        return "null"
    if tp is float:
        return "a number"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", str: "a string", bool: "true/false", dict: "a mapping"}.get(tp, str(tp))


def _coerce(value, tp, key: str):
    """Check `value` against the annotation `tp` and return it (ints widened to float where a float is due)."""
    origin = get_origin(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):   # an optional section: its own errors name
            return _coerce(value, inner[0], key)                     # the inner key
        for a in inner:
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value not in get_args(tp):
            raise bad
        return value
    if origin in (list, tuple):   # tuple[X, ...] fields of architecture configs are lists in a file
        if not isinstance(value, (list, tuple)):
            raise bad
        item = (get_args(tp) or (Any,))[0]
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):   # YAML 1.1 reads 4e-5 (no dot) as a string; accept numeric strings only
            try:
                number = float(value)
            except ValueError:
                raise bad from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        else:
            number = float(value)
        if not math.isfinite(number):   # .nan / .inf would train silently on garbage
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp}")


def _unknown(names, given, where: str) -> None:
    unknown = [k for k in given if k not in names]
    if unknown:
        k = unknown[0]
        near = difflib.get_close_matches(str(k), list(names), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else f"; known keys: {', '.join(sorted(names))}"
        raise ConfigError(f"{where + '.' if where else ''}{k}: unknown key{hint}")


def _validated_overrides(cls, d: dict, where: str, reserved: set[str]) -> dict:
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    _unknown(set(names) | reserved, d, where)
    return {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in d.items() if k not in reserved}


def _build(cls, d: dict, where: str = ""):
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    _unknown(names, d, where)
    kwargs = {k: _coerce(v, hints[k], f"{where + '.' if where else ''}{k}") for k, v in d.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:   # a config dataclass's own checks (e.g. InteractConfig)
        raise ConfigError(f"{where}: {e}") from None


def set_dotted(d: dict, dotted: str, value) -> None:
    """Apply one `a.b.c=value` override to a raw config mapping."""
    keys = dotted.split(".")
    node = d
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {k} is not a section")
    node[keys[-1]] = value


def apply_overrides(d: dict, overrides: Optional[Sequence[str]]) -> dict:
    """A deep copy of the raw mapping `d` with `key.path=value` overrides applied (values parsed as YAML)."""
    d = json.loads(json.dumps(d))   # deep copy; also rejects non-JSON values early
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        k, v = item.split("=", 1)
        set_dotted(d, k.strip(), yaml.safe_load(v))
    return d


def build_config(cls, d: Any, overrides: Optional[Sequence[str]] = None,
                 sections: Optional[dict[str, SectionBuilder]] = None):
    """Validate a raw mapping (plus `key=value` overrides) into the run config dataclass `cls`. Unknown keys and
    ill-typed values are `ConfigError`s naming the dotted key; a section given in part keeps the defaults of the
    rest; `sections` maps a field name to its own builder (value, key) -> object. Range checks are the class's
    own (`__post_init__`)."""
    if not isinstance(d, dict):
        raise ConfigError(f"a {cls.__name__} must be a mapping at the top level, got {type(d).__name__}")
    d = apply_overrides(d, overrides)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    _unknown(set(fields), d, "")
    kwargs: dict[str, Any] = {}
    for name, value in d.items():
        tp = hints[name]
        if sections and name in sections:
            kwargs[name] = sections[name](value, name)
        elif dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: expected a mapping, got {value!r}")
            default = dataclasses.asdict(fields[name].default_factory())
            kwargs[name] = _build(tp, {**default, **value}, name)
        else:
            kwargs[name] = _coerce(value, tp, name)
    return cls(**kwargs)


def read_config_file(path) -> Any:
    """The raw mapping of a `.yaml`/`.yml`, `.toml` or `.json` config file."""
    path = Path(path)
    text = read_utf8(path, "config file", ConfigError)
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:
                raise ConfigError(f"{path}: TOML configs need Python 3.11+ (tomllib); use YAML") from None
            return tomllib.loads(text)
        if path.suffix == ".json":
            return json.loads(text)
        return yaml.safe_load(text) or {}
    except (yaml.YAMLError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path}: cannot parse: {e}") from None


def load_file(cls, path, overrides: Optional[Sequence[str]] = None,
              sections: Optional[dict[str, SectionBuilder]] = None):
    """`build_config` of a config file; errors are prefixed with the file's path."""
    raw = read_config_file(path)
    try:
        return build_config(cls, raw, overrides, sections)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def check_ranges(*, positive: Optional[dict] = None, non_negative: Optional[dict] = None,
                 unit: Optional[dict] = None) -> None:
    """Range checks of named values: > 0, >= 0, within [0, 1]."""
    for k, v in (positive or {}).items():
        if v <= 0:
            raise ConfigError(f"{k} must be positive, got {v}")
    for k, v in (non_negative or {}).items():
        if v < 0:
            raise ConfigError(f"{k} must be >= 0, got {v}")
    for k, v in (unit or {}).items():
        if not 0 <= v <= 1:
            raise ConfigError(f"{k} must be in [0, 1], got {v}")


def check_run(cfg) -> None:
    """The checks every run config shares: seed, steps and threads of the train section, optimizer, checkpoints,
    log."""
    t, o = cfg.train, cfg.optim
    check_ranges(positive={"train.max_steps": t.max_steps, "optim.lr": o.lr, "log.every": cfg.log.every},
                 non_negative={"optim.warmup_steps": o.warmup_steps, "optim.grad_clip": o.grad_clip,
                               "optim.weight_decay": o.weight_decay, "checkpoint.every": cfg.checkpoint.every,
                               "checkpoint.keep_last": cfg.checkpoint.keep_last, "optim.start_step": o.start_step},
                 unit={"optim.min_lr_ratio": o.min_lr_ratio})
    if o.start_step >= t.max_steps:
        raise ConfigError(f"optim.start_step ({o.start_step}) must be below train.max_steps ({t.max_steps}): a "
                          f"restarted schedule needs steps to decay over")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    if t.threads is not None and t.threads < 1:
        raise ConfigError(f"train.threads must be >= 1 or null, got {t.threads}")
    if not 0 <= cfg.seed <= SEED_MAX:   # torch would overflow (or wrap a negative seed) only when training starts
        raise ConfigError(f"seed must be in 0 .. 2**64-1, got {cfg.seed}")


config_from_dict = RunConfig.from_dict
load_config = RunConfig.load
