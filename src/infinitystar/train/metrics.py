"""Training metrics: a JSONL log (one object per logged step), optional TensorBoard, and the running sums behind
the per-scale bit accuracy. (Peak memory: `runtime.peak_memory_mb`.)"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional

import torch


class ScaleAccuracy:
    """Sums of bit accuracy per (image or video pyramid, in-clip scale index), in fixed-size tensors so ranks can
    all-reduce them even when they packed different scales."""

    def __init__(self, scales_per_clip: int, device=None):
        self.n = scales_per_clip
        self.sums = torch.zeros(2, scales_per_clip, dtype=torch.float64, device=device)
        self.counts = torch.zeros(2, scales_per_clip, dtype=torch.float64, device=device)

    def add(self, is_video: bool, in_clip: int, acc: torch.Tensor) -> None:
        self.sums[int(is_video), in_clip] += acc.to(self.sums)
        self.counts[int(is_video), in_clip] += 1

    def packed(self) -> torch.Tensor:
        return torch.cat([self.sums.flatten(), self.counts.flatten()])

    def summary(self, packed: Optional[torch.Tensor] = None) -> dict[str, float]:
        """{"acc_image_s3": ..., "acc_video_s0": ...} for scales seen since the last reset (reduced if given)."""
        p = self.packed() if packed is None else packed
        sums, counts = p[:2 * self.n].view(2, self.n), p[2 * self.n:].view(2, self.n)
        out = {}
        for kind, name in ((0, "image"), (1, "video")):
            for s in range(self.n):
                if counts[kind, s] > 0:
                    out[f"acc_{name}_s{s}"] = round(float(sums[kind, s] / counts[kind, s]), 5)
        return out

    def reset(self) -> None:
        self.sums.zero_()
        self.counts.zero_()


class MetricsLogger:
    """Rank 0 appends JSON lines to `path` (and TensorBoard scalars when asked and installed)."""

    def __init__(self, path: Optional[Path], tensorboard_dir: Optional[Path] = None):
        self.path = Path(path) if path is not None else None
        self.tb = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(tensorboard_dir))
            except ImportError:
                warnings.warn("log.tensorboard is on but tensorboard is not installed (pip install tensorboard); "
                              "metrics go to the JSONL log only", stacklevel=2)

    def log(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps after `step` (a resumed run logs them again)."""
        if self.path is None or not self.path.is_file():
            return
        keep = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
