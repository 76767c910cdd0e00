"""Run the real code without memory or compute: a simulated accelerator on the meta device.

`Simulator` is a pair of torch modes. Inside it, tensors on the meta device stand for accelerator memory and every
op of the real code runs on them (shapes, dtypes and strides are exact; no values, no FLOPs spent). It records:

* the bytes of every live storage, allocated when an op creates it and freed when its last reference dies (a weak
  reference on the storage object), rounded to the CUDA caching allocator's 512-byte blocks by default;
* per stage (`stage(name)`): the peak of live accelerator bytes, split at that moment into categories (weights,
  kv_cache, activations), the FLOPs of matmuls, convolutions and attention, and a workspace estimate;
* host memory: `tensor.to("cpu")` / `.cpu()` / `module.to("cpu")` of a meta tensor makes a meta tensor that is
  booked as host memory (the device side is freed), and moving it back allocates device memory again. Ops whose
  inputs live on the host run "on the host" (their outputs are host memory and their FLOPs host FLOPs).
  `.numpy()` of such a tensor gives an uninitialised array of its shape.

Kernel choices follow a CUDA run rather than the meta device's defaults: `F.scaled_dot_product_attention` runs the
fused (flash) kernel, whose only allocations are its output and the log-sum-exp rows, and convolutions run the
plain kernel (no oneDNN path).

Speed: op outputs are memoised by (op, input shapes/strides/dtypes, other arguments), so the meta kernels (many
written in Python) run once per signature; ops that alias or mutate their inputs always run. Small tensors whose
values derive only from known data (token ids, masks, positions) also carry a real CPU copy of their values
("shadow"), so data-dependent Python such as `mask.all()` or `.item()` gets the true answer. A plan assumes
finite numbers: `torch.isfinite` of anything is all-true (the real code's NaN checks pass).
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

aten = torch.ops.aten
META = torch.device("meta")

# Categories of accelerator memory.
WEIGHTS, KV_CACHE, ACTIVATIONS = "weights", "kv_cache", "activations"
CATEGORIES = (WEIGHTS, KV_CACHE, ACTIVATIONS)

# The CUDA caching allocator hands out blocks in multiples of 512 bytes (and 512 at least).
CUDA_BLOCK = 512
# cuBLAS keeps one workspace per handle and stream: 32 MiB on Hopper (the larger of PyTorch's defaults), so a
# matmul needs that much besides its output.
MATMUL_WORKSPACE = 32 * 2 ** 20


@dataclass(frozen=True)
class Kernels:
    """Scratch memory the kernels of a device take besides their outputs (invisible to the op-level tracking):
    matmul: bytes per matmul; conv: (input, output) -> bytes."""
    name: str
    block: int
    matmul: int
    conv: Callable[[torch.Tensor, torch.Tensor], int]


def _channel_blocked_bytes(t: torch.Tensor, block: int) -> int:
    """Bytes of `t` in oneDNN's channel-blocked layout: the channels (dim 1) padded to a multiple of `block`."""
    c = t.shape[1]
    return t.numel() // max(c, 1) * (-(-c // block) * block) * t.element_size()


def _onednn_conv_scratch(x: torch.Tensor, out: torch.Tensor) -> int:
    """A oneDNN convolution on plain tensors: it reorders the input into a channel-blocked copy and computes into a
    blocked output, then reorders that into the plain output (after dropping the input copy). Channel blocks are
    16 wide with AVX-512, else 8. Per-op peaks measured with the kernel's high-water mark on the small video VAE's
    decoder match this (e.g. 16 -> 3 channels: input copy plus an output padded to 16 channels)."""
    block = 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8
    xb, ob = _channel_blocked_bytes(x, block), _channel_blocked_bytes(out, block)
    plain = out.numel() * out.element_size()
    return max(xb + ob, ob + plain) - plain


# CUDA: cuBLAS's workspace; cuDNN picks a convolution algorithm whose workspace fits the free memory, so it adds
# no fixed amount (benchmarks/gpu.py measures what it takes). CPU (used to check plans against real runs here):
# oneDNN's blocked-layout copies around each convolution.
KERNELS = {"cuda": Kernels("cuda", CUDA_BLOCK, MATMUL_WORKSPACE, lambda x, out: 0),
           "cpu": Kernels("cpu", 1, 0, _onednn_conv_scratch)}

# The largest storages near each stage's peak are listed (refreshed whenever the peak grows by this fraction).
TOP_N, TOP_REFRESH = 8, 0.01

# Values of tensors up to this many bytes are computed for real (see the module doc).
SHADOW_LIMIT = 1 << 12

_MATMULS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm}
_CONVS = {aten.convolution, aten._convolution}
_FLASH_CPU = aten._scaled_dot_product_flash_attention_for_cpu.default
_FLOP_OPS = _MATMULS | _CONVS | {_FLASH_CPU.overloadpacket}
# Finiteness checks and the reductions of their all-true results (see `_Dispatch._constant`).
_FINITE_OPS = {aten.all.default, aten.any.default, aten.logical_not.default, aten.bitwise_not.default}
_KEEP_CATEGORY = {aten._to_copy.default, aten.clone.default}
_COPY = aten.copy_.default

class PlanError(RuntimeError):
    """The simulated run hit something it cannot answer without real data."""


@dataclass
class StageStats:
    """What one stage of a simulated run used. Bytes are accelerator bytes unless named host."""
    name: str
    start_bytes: int = 0                       # live when the stage began
    peak_bytes: int = 0                        # highest live total during the stage (workspace excluded)
    peak_categories: dict = field(default_factory=dict)   # category -> bytes at that moment
    workspace_bytes: int = 0                   # workspace estimate of the op that set the peak with workspace
    peak_with_workspace: int = 0               # highest (live + the running op's workspace)
    end_bytes: int = 0
    flops: float = 0.0                         # accelerator FLOPs (matmul, convolution, attention)
    host_flops: float = 0.0
    host_peak_bytes: int = 0
    transfer_bytes: int = 0                    # bytes copied between host and device during the stage
    ops: int = 0
    top: list = field(default_factory=list)    # the largest live storages near the peak (see Simulator.largest)
    _top_at: int = 0

    def to_dict(self) -> dict:
        return {"name": self.name, "peak_bytes": self.peak_with_workspace, "peak_live_bytes": self.peak_bytes,
                "weights_bytes": self.peak_categories.get(WEIGHTS, 0),
                "kv_cache_bytes": self.peak_categories.get(KV_CACHE, 0),
                "activations_bytes": self.peak_categories.get(ACTIVATIONS, 0),
                "workspace_bytes": self.workspace_bytes, "start_bytes": self.start_bytes,
                "end_bytes": self.end_bytes, "flops": self.flops, "host_flops": self.host_flops,
                "host_peak_bytes": self.host_peak_bytes, "transfer_bytes": self.transfer_bytes, "ops": self.ops,
                "largest_at_peak": self.top}


class _Entry:
    __slots__ = ("nbytes", "host", "category", "ref", "origin")

    def __init__(self, nbytes: int, host: bool, category: str, origin: str):
        self.nbytes, self.host, self.category, self.ref, self.origin = nbytes, host, category, None, origin


class _Unhashable(Exception):
    pass


_NUMBERS = (int, float, bool)
_VALUES = (str, torch.dtype, torch.device, torch.memory_format, torch.layout)


def _scan(args, ts: list) -> tuple:
    """Collect the tensors of an op's arguments into `ts` and return their hashable signature: tensors by metadata,
    numbers by type and value (2 and 2.0 give different dtypes), other values as they are; raises _Unhashable for
    anything else. One call per container (the hot path of the simulator)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            ts.append(a)
            out.append((a.shape, a.stride(), a.dtype, a.is_meta))
        elif isinstance(a, _NUMBERS):
            out.append((type(a), a))
        elif a is None or isinstance(a, _VALUES):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.append(_scan(a, ts))
        else:
            raise _Unhashable
    return tuple(out)


def _tensors(x, out: list) -> list:
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for y in x:
            _tensors(y, out)
    elif isinstance(x, dict):
        for y in x.values():
            _tensors(y, out)
    return out


def _map(x, fn):
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, list):
        return [_map(y, fn) for y in x]
    if isinstance(x, tuple):
        return tuple(_map(y, fn) for y in x)
    if isinstance(x, dict):
        return {k: _map(v, fn) for k, v in x.items()}
    return x


class Simulator:
    """Track a simulated run. Use as a context manager; name stages with `stage(name)`.

    kernels: "cuda" (512-byte allocator blocks, cuBLAS workspace) or "cpu" (exact bytes, oneDNN convolution
    buffers; for checking plans against real CPU runs), see `KERNELS`.
    """

    def __init__(self, kernels: str = "cuda"):
        if kernels not in KERNELS:
            raise ValueError(f"unknown kernel profile {kernels!r}; choose one of {', '.join(KERNELS)}")
        self.kernels = KERNELS[kernels]
        self.block = self.kernels.block
        self._entries: dict[int, _Entry] = {}
        self.device_bytes = 0
        self.host_bytes = 0
        self.categories = dict.fromkeys(CATEGORIES, 0)
        self.stages: list[StageStats] = []
        self._stage: Optional[StageStats] = None
        self._place_host: Optional[bool] = None   # set: allocations made now go to the host (True) / device
        self._place_category: Optional[str] = None
        self._memo: dict = {}
        self._op_kind: dict = {}          # op -> outputs may be memoised (else the op always runs)
        self._flops_memo: dict = {}
        self._shadows: dict[int, torch.Tensor] = {}
        self._constants: dict[int, object] = {}   # storages whose every element is known to be one value
        self._dispatch = _Dispatch(self)
        self._function = _Function(self)
        self._stack: Optional[contextlib.ExitStack] = None

    # --- context ----------------------------------------------------------------------------------------------
    def __enter__(self) -> "Simulator":
        self._stack = contextlib.ExitStack()
        with warnings.catch_warnings():      # toggling oneDNN warns about an unrelated TF32 setting
            warnings.simplefilter("ignore")
            self._stack.enter_context(torch.backends.mkldnn.flags(enabled=False))
        self._stack.enter_context(self._function)
        self._stack.enter_context(self._dispatch)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._stack = None

    @property
    def current(self) -> Optional[str]:
        return self._stage.name if self._stage is not None else None

    def begin(self, name: str) -> StageStats:
        """End the current stage (if any) and start collecting under `name`."""
        self.end()
        st = StageStats(name, start_bytes=self.device_bytes, peak_bytes=self.device_bytes,
                        peak_categories=dict(self.categories), peak_with_workspace=self.device_bytes,
                        host_peak_bytes=self.host_bytes)
        self._stage = st
        return st

    def end(self) -> None:
        st = self._stage
        if st is not None:
            st.end_bytes = self.device_bytes
            self._stage = None
            self.stages.append(st)

    @contextlib.contextmanager
    def stage(self, name: str):
        """Collect the statistics of the enclosed code under `name`."""
        st = self.begin(name)
        try:
            yield st
        finally:
            self.end()

    @contextlib.contextmanager
    def placing(self, host: Optional[bool], category: Optional[str] = None):
        """Allocations inside are booked on the host (or the device) under `category`."""
        saved = self._place_host, self._place_category
        self._place_host, self._place_category = host, category
        try:
            yield
        finally:
            self._place_host, self._place_category = saved

    # --- storages -----------------------------------------------------------------------------------------------
    def _round(self, n: int) -> int:
        if n <= 0:
            return 0
        b = self.block
        return (n + b - 1) // b * b

    def entry(self, t: torch.Tensor) -> Optional[_Entry]:
        return self._entries.get(id(t.untyped_storage()))

    def is_host(self, t: torch.Tensor) -> bool:
        e = self.entry(t)
        return e is not None and e.host

    def _is_host_sid(self, sid: int) -> bool:
        e = self._entries.get(sid)
        return e is not None and e.host

    def _category_sid(self, sid: int) -> str:
        e = self._entries.get(sid)
        return e.category if e is not None else ACTIVATIONS

    def category_of(self, t: torch.Tensor) -> str:
        e = self.entry(t)
        return e.category if e is not None else ACTIVATIONS

    def register(self, t: torch.Tensor, host: bool = False, category: str = ACTIVATIONS, origin=None) -> None:
        """Book a meta tensor's storage (once; later calls re-file it under the new placement and category)."""
        st = t.untyped_storage()
        key = id(st)
        e = self._entries.get(key)
        if e is not None:
            self._unbook(e)
            e.host, e.category = host, category
            self._book(e)
            return
        e = _Entry(self._round(st.nbytes()), host, category, origin or (None, t.shape, t.dtype))
        e.ref = weakref.ref(st, lambda _r, key=key: self._free(key))
        self._entries[key] = e
        self._book(e)

    def recategorise(self, t: torch.Tensor, category: str) -> None:
        e = self.entry(t)
        if e is None or e.category == category:
            return
        self._unbook(e)
        e.category = category
        self._book(e)

    def _book(self, e: _Entry) -> None:
        if e.host:
            self.host_bytes += e.nbytes
            st = self._stage
            if st is not None and self.host_bytes > st.host_peak_bytes:
                st.host_peak_bytes = self.host_bytes
        else:
            self.device_bytes += e.nbytes
            self.categories[e.category] += e.nbytes

    def _unbook(self, e: _Entry) -> None:
        if e.host:
            self.host_bytes -= e.nbytes
        else:
            self.device_bytes -= e.nbytes
            self.categories[e.category] -= e.nbytes

    def _free(self, key: int) -> None:
        e = self._entries.pop(key, None)
        if e is not None:
            self._unbook(e)
        self._shadows.pop(key, None)
        self._constants.pop(key, None)

    def _note_peak(self, workspace: int) -> None:
        st = self._stage
        if st is None:
            return
        live = self.device_bytes
        if live > st.peak_bytes:
            st.peak_bytes = live
            st.peak_categories = dict(self.categories)
            if live > st._top_at * (1 + TOP_REFRESH):
                st._top_at = live
                st.top = self.largest()
        if live + workspace > st.peak_with_workspace:
            st.peak_with_workspace = live + workspace
            st.workspace_bytes = workspace

    def largest(self, n: int = TOP_N) -> list[dict]:
        """The n largest live device storages: bytes, category and what made them (op, shape, dtype)."""
        live = [e for e in self._entries.values() if not e.host]
        live.sort(key=lambda e: -e.nbytes)
        return [{"bytes": e.nbytes, "category": e.category, "op": e.origin[0].__name__ if e.origin[0] else "moved",
                 "shape": list(e.origin[1]), "dtype": str(e.origin[2]).replace("torch.", "")} for e in live[:n]]

    # --- shadow values ----------------------------------------------------------------------------------------------
    def value(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        """The real values of a meta tensor when they are known, else None."""
        if t.device.type != "meta":
            return t
        sh = self._shadows.get(id(t.untyped_storage()))
        if sh is None:
            return None
        return sh.view(t.dtype).as_strided(t.shape, t.stride(), t.storage_offset())

    def _set_value(self, t: torch.Tensor, v: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st.nbytes() > SHADOW_LIMIT:
            return
        buf = torch.empty(st.nbytes(), dtype=torch.uint8)
        self._shadows[id(st)] = buf
        self.value(t).copy_(v)


class _Function(TorchFunctionMode):
    """Device moves between the simulated host and device, and the fused attention kernel."""

    def __init__(self, sim: Simulator):
        super().__init__()
        self.sim = sim

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to or func is torch.Tensor.cpu:
            t = args[0]
            if isinstance(t, torch.Tensor) and t.device.type == "meta":
                if func is torch.Tensor.cpu:
                    device, dtype = torch.device("cpu"), None
                else:
                    device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
                if device is not None:
                    return self._move(t, device.type != "meta", dtype)
        elif func is torch.Tensor.numpy:
            t = args[0]
            if isinstance(t, torch.Tensor) and t.device.type == "meta":
                v = self.sim.value(t)
                if v is not None:
                    return v.numpy()
                # the frames handed back to the caller: an uninitialised array of their shape (no pages touched)
                return np.empty(tuple(t.shape), dtype=torch.empty(0, dtype=t.dtype, device="cpu").numpy().dtype)
        elif func is torch.isfinite:
            t = args[0]
            out = func(*args, **kwargs)
            if isinstance(t, torch.Tensor) and t.device.type == "meta" and self.sim.value(out) is None:
                self.sim._constants[id(out.untyped_storage())] = True     # see _Dispatch._constant
            return out
        elif func is F.scaled_dot_product_attention:
            q = args[0]
            if isinstance(q, torch.Tensor) and q.device.type == "meta":
                return _fused_attention(*args, **kwargs)
        return func(*args, **kwargs)

    def _move(self, t: torch.Tensor, to_host: bool, dtype) -> torch.Tensor:
        sim = self.sim
        from_host = sim.is_host(t)
        dtype = dtype or t.dtype
        if from_host == to_host and dtype == t.dtype:
            return t
        with sim.placing(to_host, sim.category_of(t)):
            out = torch.empty_like(t, dtype=dtype)
        sim.entry(out).origin = (None, out.shape, out.dtype)      # listed as "moved"
        if from_host != to_host and sim._stage is not None:
            sim._stage.transfer_bytes += out.untyped_storage().nbytes()
        v = sim.value(t)
        if v is not None:
            sim._set_value(out, v.to(dtype))
        return out


def _fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """What a fused attention kernel allocates: the output (and log-sum-exp rows); never the score matrix."""
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device)   # SDPA converts bool masks too
    return _FLASH_CPU(q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


# How an op's outputs are produced without running its meta kernel again (decided from its schema, corrected
# when a first run shows otherwise).
_MEMO, _VIEW, _INPLACE, _DIRECT = 0, 1, 2, 3
_NEVER_MEMO = {aten.resize_.default, aten.set_.source_Storage, aten.set_.source_Tensor, aten.set_.default}


def _op_kind(func) -> int:
    s = func._schema
    returns_alias = any(r.alias_info is not None for r in s.returns)
    if func in _NEVER_MEMO or torch.Tag.inplace_view in func.tags:
        return _DIRECT
    if not s.is_mutable:
        return _VIEW if returns_alias else _MEMO
    first = s.arguments[0] if s.arguments else None
    writes_first = first is not None and first.alias_info is not None and first.alias_info.is_write
    return _INPLACE if writes_first and len(s.returns) == 1 and returns_alias else _DIRECT


class _Dispatch(TorchDispatchMode):
    def __init__(self, sim: Simulator):
        super().__init__()
        self.sim = sim

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False      # nothing here is compiled; skipping the Dynamo guard saves a wrapper per op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sim = self.sim
        ts: list = []
        try:
            key = (func, _scan(args, ts), _scan(tuple(kwargs.items()), ts) if kwargs else None)
        except _Unhashable:
            key = None
            ts = _tensors(args, [])
            _tensors(kwargs, ts)
        metas = [t for t in ts if t.is_meta]
        if not metas:
            # Real data (random numbers drawn on the CPU, token ids) or a factory: run it; book what lands on
            # the simulated device.
            out = func(*args, **kwargs)
            outs = _tensors(out, [])
            if not any(t.is_meta for t in outs):
                return out
            return self._new(func, args, kwargs, metas, [], out, outs, None, bool(sim._place_host),
                             sim._place_category or ACTIVATIONS)
        if func is _COPY and sim._stage is not None and sim.is_host(args[0]) != sim.is_host(args[1]):
            sim._stage.transfer_bytes += args[1].numel() * args[1].element_size()   # into a kept buffer
        if func is aten._local_scalar_dense.default:
            v = sim.value(args[0])
            c = sim._constants.get(id(args[0].untyped_storage()))
            if v is None and c is not None:
                return c
            if v is None:
                raise PlanError("the code reads a value (.item(), a Python bool or int) of a tensor whose values a "
                                "plan cannot know")
            return v.item()

        kind = sim._op_kind.get(func)
        if kind is None:
            kind = sim._op_kind[func] = _op_kind(func)
        sids = [id(t.untyped_storage()) for t in metas]
        spec = sim._memo.get(key) if key is not None and kind != _DIRECT else None
        if spec is not None:
            if kind == _MEMO:
                out = _build(spec)
            elif kind == _VIEW:
                base = args[0]
                out = _build_view(spec, base, base.storage_offset())
                return out          # a view: its values (if known) come from its storage
            else:
                return self._after_alias(func, args, kwargs, metas, sids, args[0])
        else:
            out = func(*args, **kwargs)
            outs = _tensors(out, [])
            aliased = [t for t in outs if t.is_meta and id(t.untyped_storage()) in sids]
            if kind == _MEMO and aliased:
                kind = sim._op_kind[func] = _DIRECT     # aliases an input although its schema does not say so
            if kind in (_VIEW, _INPLACE):
                base = args[0] if isinstance(args[0], torch.Tensor) else None
                view_ok = (base is not None and len(aliased) == len(outs) and
                           all(t.untyped_storage() is base.untyped_storage() and t.dtype == base.dtype for t in outs))
                if kind == _INPLACE and not (outs and outs[0] is base):
                    view_ok = False
                if not view_ok:
                    kind = sim._op_kind[func] = _DIRECT
                elif key is not None:
                    sim._memo[key] = (_view_spec(out, base.storage_offset()) if kind == _VIEW else ("S",))
                if kind != _DIRECT:
                    return self._after_alias(func, args, kwargs, metas, sids, out)
            elif kind == _MEMO and key is not None:
                spec = _spec(out)
                if spec is not None:
                    sim._memo[key] = spec
        host = sim._place_host if sim._place_host is not None else any(sim._is_host_sid(i) for i in sids)
        category = sim._place_category or (sim._category_sid(sids[0]) if func in _KEEP_CATEGORY else ACTIVATIONS)
        return self._new(func, args, kwargs, metas, sids, out, _tensors(out, []), key, host, category)

    def _after_alias(self, func, args, kwargs, metas, sids, out):
        """A view or an in-place op: no new memory; keep small values right."""
        shadows = self.sim._shadows
        if shadows and func._schema.is_mutable and any(i in shadows for i in sids):
            self._shadow(func, args, kwargs, metas, sids, out, [])
        return out

    def _new(self, func, args, kwargs, metas, sids, out, outs, key, host: bool, category: str):
        """Book an op's new storages, carry small values, count FLOPs and note the peak."""
        sim = self.sim
        fresh = []
        for t in outs:
            if t.is_meta and sim.entry(t) is None:
                sim.register(t, host, category, (func, t.shape, t.dtype))
                fresh.append(t)
        shadows = sim._shadows
        if not metas or (shadows and all(i in shadows for i in sids)) or (shadows and func._schema.is_mutable):
            self._shadow(func, args, kwargs, metas, sids, out, fresh)
        if func in _FINITE_OPS and fresh:
            self._constant(func, sids, fresh)
        flops, workspace = 0.0, 0
        packet = func.overloadpacket
        if packet in _FLOP_OPS:
            flops, workspace = self._flops(func, packet, args, kwargs, out, key)
        st = sim._stage
        if st is not None:
            st.ops += 1
            if host:
                st.host_flops += flops
            else:
                st.flops += flops
        sim._note_peak(0 if host else workspace)
        return out

    def _constant(self, func, sids, fresh) -> None:
        """Finiteness checks of the real code: a plan assumes finite numbers (a real run with NaN or inf logits
        stops at its check), so `torch.isfinite` of anything is all-true (the function mode marks it) and
        reductions and negations of such constant tensors are known."""
        const = self.sim._constants
        if all(i in const for i in sids):
            with torch.utils._python_dispatch._disable_current_modes():
                value = func(torch.tensor([const[i] for i in sids][:1])).reshape(-1)[0].item()
        else:
            return
        for t in fresh:
            const[id(t.untyped_storage())] = value

    def _flops(self, func, packet, args, kwargs, out, key) -> tuple[float, int]:
        if func is _FLASH_CPU:
            q, k, v = args[:3]
            # grouped-query attention: every query head does its own work (older torch's count wants equal heads)
            heads = lambda t: (*t.shape[:1], q.shape[1], *t.shape[2:])
            return float(sdpa_flop_count(q.shape, heads(k), heads(v))), 0
        f = self.sim._flops_memo.get(key) if key is not None else None
        if f is None:
            f = float(flop_registry[packet](*args, **kwargs, out_val=out))
            if key is not None:
                self.sim._flops_memo[key] = f
        k = self.sim.kernels
        if packet in _MATMULS:
            return f, k.matmul
        return f, k.conv(args[0], out)

    def _shadow(self, func, args, kwargs, metas, sids, out, fresh) -> None:
        """Carry the real values of small tensors through the op when every input's values are known."""
        sim = self.sim
        shadows = sim._shadows
        known = all(i in shadows for i in sids) and all(
            t.untyped_storage().nbytes() <= SHADOW_LIMIT for t in fresh)
        mutable = func._schema.is_mutable
        if not known:
            if mutable:
                for i in sids:
                    shadows.pop(i, None)
            return
        if not fresh and not mutable:
            return
        real_args = _map(args, lambda t: sim.value(t) if t.is_meta else t)
        real_kwargs = _map(kwargs, lambda t: sim.value(t) if t.is_meta else t)
        if real_kwargs.get("device") is not None and torch.device(real_kwargs["device"]).type == "meta":
            real_kwargs["device"] = torch.device("cpu")
        try:
            with torch.utils._python_dispatch._disable_current_modes():
                real = func(*real_args, **real_kwargs)
        except Exception:     # a CPU kernel refusing what a meta kernel accepted: the values stay unknown
            for i in sids:
                shadows.pop(i, None)
            for t in fresh:
                shadows.pop(id(t.untyped_storage()), None)
            return
        fresh_ids = {id(t) for t in fresh}
        for t, r in zip(_tensors(out, []), _tensors(real, [])):
            if id(t) in fresh_ids:
                sim._set_value(t, r)


def _spec(out):
    if isinstance(out, torch.Tensor):
        if not out.is_meta:
            return None
        return ("T", tuple(out.shape), out.stride(), out.dtype)
    if isinstance(out, (list, tuple)):
        parts = [_spec(o) if o is not None else ("N",) for o in out]
        if any(p is None for p in parts):
            return None
        return ("L" if isinstance(out, list) else "U", parts)
    return None


def _build(spec):
    kind = spec[0]
    if kind == "T":
        return aten.empty_strided.default(spec[1], spec[2], dtype=spec[3], device=META)
    if kind == "N":
        return None
    parts = [_build(p) for p in spec[1]]
    return parts if kind == "L" else tuple(parts)


def _view_spec(out, base_offset: int):
    if isinstance(out, torch.Tensor):
        return ("V", tuple(out.shape), out.stride(), out.storage_offset() - base_offset)
    return ("L" if isinstance(out, list) else "U", [_view_spec(o, base_offset) for o in out])


def _build_view(spec, base: torch.Tensor, offset: int):
    if spec[0] == "V":
        return aten.as_strided.default(base, spec[1], spec[2], offset + spec[3])
    parts = [_build_view(p, base, offset) for p in spec[1]]
    return parts if spec[0] == "L" else tuple(parts)


def register_module(sim: Simulator, module: torch.nn.Module, host: bool = True) -> int:
    """Book a meta-constructed module's parameters and buffers as weights (on the host by default: "read from
    the files"). Returns their bytes."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        st = t.untyped_storage()
        if id(st) in seen:
            continue
        seen.add(id(st))
        sim.register(t, host=host, category=WEIGHTS)
        total += st.nbytes()
    return total


__all__ = ["Simulator", "StageStats", "PlanError", "register_module", "WEIGHTS", "KV_CACHE", "ACTIVATIONS",
           "CATEGORIES", "CUDA_BLOCK", "MATMUL_WORKSPACE", "KERNELS", "Kernels"]
