"""`SSTAStats`: optional per-call record of density and attention time, for reports.

Recording keeps tensors on the device (density) and CUDA events (time) until `summary` is called,
so it adds no host synchronisation to the denoising loop. On the CPU, time is wall-clock around the
attention op (which is synchronous there).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

__all__ = ["SSTAStats", "AttentionRecord"]


@dataclass
class AttentionRecord:
    """One attention call: where it ran and what it kept."""

    step: int
    layer: int
    sparse_type: str                  # the resolved config's sparse_type ("mixed" for per-head groups)
    thw: tuple
    text_len: int
    density: Optional[torch.Tensor]   # float32 scalar on the device (mean of the block mask)
    seconds: Optional[float] = None   # CPU wall-clock
    events: Optional[tuple] = None    # (start, end) CUDA events

    def elapsed(self) -> Optional[float]:
        if self.events is not None:
            return self.events[0].elapsed_time(self.events[1]) / 1e3
        return self.seconds


class SSTAStats:
    """Collects an `AttentionRecord` per SSTA attention call.

    Args:
        time: also time each call (CUDA events on GPU, wall-clock on CPU).
    """

    def __init__(self, time: bool = True) -> None:
        self.time = time
        self.records: List[AttentionRecord] = []

    def reset(self) -> None:
        self.records.clear()

    def start(self, device: torch.device) -> Any:
        """Begin timing one call; returns a token for `stop`."""
        if not self.time:
            return None
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, token: Any, record: AttentionRecord) -> None:
        if token is None:
            pass
        elif isinstance(token, float):
            record.seconds = time.perf_counter() - token
        else:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            record.events = (token, end)
        self.records.append(record)

    # ------------------------------------------------------------------ reports
    def summary(self) -> Dict[str, Any]:
        """Aggregates (synchronises once): per step and per layer mean density and total seconds."""
        if any(r.events is not None for r in self.records):
            torch.cuda.synchronize()
        dens = [float(r.density) if r.density is not None else float("nan") for r in self.records]
        secs = [r.elapsed() for r in self.records]

        def agg(key):
            groups: Dict[int, List[int]] = defaultdict(list)
            for i, r in enumerate(self.records):
                groups[getattr(r, key)].append(i)
            return {k: {"calls": len(ix), "density": sum(dens[i] for i in ix) / len(ix),
                        "seconds": sum(secs[i] or 0.0 for i in ix),
                        "sparse_types": sorted({self.records[i].sparse_type for i in ix})}
                    for k, ix in sorted(groups.items())}

        n = len(self.records)
        return {
            "calls": n,
            "mean_density": sum(dens) / n if n else float("nan"),
            "attention_seconds": sum(s or 0.0 for s in secs),
            "per_step": agg("step"),
            "per_layer": agg("layer"),
        }

    def format(self) -> str:
        """A short text table: one line per denoising step."""
        s = self.summary()
        lines = [f"SSTA attention: {s['calls']} calls, mean density {s['mean_density']:.3f}, "
                 f"{s['attention_seconds']:.3f} s in attention"]
        lines.append(f"{'step':>5} {'calls':>6} {'density':>8} {'seconds':>9}  mode")
        for step, v in s["per_step"].items():
            lines.append(f"{step:>5} {v['calls']:>6} {v['density']:>8.3f} {v['seconds']:>9.4f}  "
                         f"{','.join(v['sparse_types'])}")
        return "\n".join(lines)
