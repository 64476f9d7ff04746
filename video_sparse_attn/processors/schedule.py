"""`SSTASchedule`: which attention each (denoising step, layer, head) runs.

A schedule refines a base `SSTAConfig` per call:

- ``dense_steps``: the first N denoising steps run dense attention (STA's recipe keeps 15 of 50);
- ``dense_layers``: these layer indices always run dense attention;
- ``mask_strategy``: FastVideo-style overrides keyed ``"step_layer_head"`` (each part an int or
  ``"*"``). A value is either a window ``[Kt, Kh, Kw]`` in tiles (sets ``kernel_thw``) or a dict of
  `SSTAConfig` fields (e.g. ``{"topk": 16}``, ``{"sparse_type": "dense"}``). When several keys
  match, the more specific one (more concrete parts) wins; among equally specific keys the later one.

"Dense" means ``sparse_type="dense"`` with ``pad_type="mask"``: every block is kept and padding is
excluded token by token, which equals full attention over the real tokens. Dense steps and layers
take precedence over the mask strategy.

Layers are numbered in execution order over the attention layers SSTA replaces (HunyuanVideo:
double-stream blocks first, then single-stream blocks; Wan: the self-attention of each block).
Schedules are plain values: they hold no step counter (the step comes from the pipeline, see
`grid_hook.SSTARuntime`), so one schedule can serve any number of transformers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..config import SSTAConfig

__all__ = ["SSTASchedule", "HeadGroup"]

METADATA_KEY = "ssta_schedule"
_KEY = re.compile(r"^(\*|\d+)_(\*|\d+)_(\*|\d+)$")

HeadGroup = Tuple[int, int, SSTAConfig]  # heads [start, stop) run with this config


def _parse_key(key: str) -> Tuple[Optional[int], Optional[int], Optional[int]]:
    m = _KEY.match(str(key).strip())
    if not m:
        raise ValueError(
            f"mask_strategy key {key!r} must look like 'step_layer_head' with ints or '*' (e.g. '0_*_3')"
        )
    return tuple(None if p == "*" else int(p) for p in m.groups())  # type: ignore[return-value]


def _parse_value(key: str, value: Any) -> Dict[str, Any]:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, int) for v in value):
        return {"kernel_thw": tuple(value)}
    raise ValueError(
        f"mask_strategy[{key!r}] must be a window [Kt, Kh, Kw] or a dict of SSTAConfig fields, got {value!r}"
    )


@dataclass(frozen=True)
class SSTASchedule:
    """Per step / layer / head refinements of a base `SSTAConfig` (see the module docstring).

    Attributes:
        dense_steps: number of leading denoising steps that run dense attention.
        dense_layers: layer indices that always run dense attention.
        mask_strategy: ``{"step_layer_head": window or {field: value}}`` overrides.
    """

    dense_steps: int = 0
    dense_layers: Tuple[int, ...] = ()
    mask_strategy: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        steps = self.dense_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"dense_steps must be an int >= 0, got {self.dense_steps!r}")
        layers = tuple(int(x) for x in self.dense_layers)
        if any(x < 0 for x in layers):
            raise ValueError(f"dense_layers must be layer indices >= 0, got {self.dense_layers!r}")
        object.__setattr__(self, "dense_layers", layers)
        rules = []
        probe = SSTAConfig(caller_rules=False)
        for i, (key, value) in enumerate(dict(self.mask_strategy).items()):
            parts = _parse_key(key)
            changes = _parse_value(key, value)
            try:
                probe.replace(**changes)
            except TypeError as e:
                raise ValueError(f"mask_strategy[{key!r}]: {e}") from None
            specificity = sum(p is not None for p in parts)
            rules.append((specificity, i, parts, changes))
        rules.sort(key=lambda r: (r[0], r[1]))
        object.__setattr__(self, "_rules", tuple((r[2], r[3]) for r in rules))
        object.__setattr__(self, "_cache", {})

    # frozen dataclass with a private cache: hash / compare on the public fields only
    def __hash__(self) -> int:
        return hash(self.to_json())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SSTASchedule) and self.to_dict() == other.to_dict()

    # ------------------------------------------------------------------ queries
    @property
    def uses_step(self) -> bool:
        """Whether any rule depends on the denoising step (only then is the step read)."""
        return self.dense_steps > 0 or any(parts[0] is not None for parts, _ in self._rules)

    def config_for(self, base: SSTAConfig, step: int, layer: int, head: Optional[int] = None) -> SSTAConfig:
        """The config one head (or, with ``head=None``, rules without a head part) runs with."""
        if step < self.dense_steps or layer in self.dense_layers:
            return base.as_dense()
        changes: Dict[str, Any] = {}
        for (s, ly, h), rule in self._rules:
            if (s is None or s == step) and (ly is None or ly == layer) and (h is None or h == head):
                changes.update(rule)
        return base.replace(**changes) if changes else base

    def head_groups(self, base: SSTAConfig, step: int, layer: int, num_heads: int) -> List[HeadGroup]:
        """Contiguous head ranges that share a config: ``[(start, stop, config), ...]``.

        One group covering all heads unless the mask strategy names individual heads. Cached per
        (base, step, layer, num_heads) on this schedule object.
        """
        key = (base, step, layer, num_heads)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        if not any(parts[2] is not None for parts, _ in self._rules):
            groups = [(0, num_heads, self.config_for(base, step, layer, None))]
        else:
            groups: List[HeadGroup] = []
            for h in range(num_heads):
                cfg = self.config_for(base, step, layer, h)
                if groups and groups[-1][2] == cfg:
                    groups[-1] = (groups[-1][0], h + 1, cfg)
                else:
                    groups.append((h, h + 1, cfg))
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[key] = groups
        return groups

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        strategy = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(self.mask_strategy).items()}
        return {"dense_steps": self.dense_steps, "dense_layers": list(self.dense_layers),
                "mask_strategy": strategy}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SSTASchedule":
        unknown = set(d) - {"dense_steps", "dense_layers", "mask_strategy"}
        if unknown:
            raise ValueError(f"unknown SSTASchedule fields {sorted(unknown)}")
        return cls(int(d.get("dense_steps", 0)), tuple(d.get("dense_layers", ())),
                   dict(d.get("mask_strategy", {})))

    @classmethod
    def from_mask_strategy(cls, strategy: Mapping[str, Any], dense_steps: int = 0) -> "SSTASchedule":
        """From a bare FastVideo-style ``{"step_layer_head": [Kt, Kh, Kw]}`` dict."""
        return cls(dense_steps=dense_steps, mask_strategy=dict(strategy))

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "SSTASchedule":
        return cls.from_dict(json.loads(text))

    def to_metadata(self) -> dict:
        """``{"ssta_schedule": json}`` for ``safetensors`` metadata (string values only)."""
        return {METADATA_KEY: self.to_json()}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> "SSTASchedule":
        if METADATA_KEY not in metadata:
            raise ValueError(f"metadata has no {METADATA_KEY!r} entry (keys: {sorted(metadata)})")
        return cls.from_json(metadata[METADATA_KEY])

    def save(self, path: str) -> None:
        """Write the schedule as JSON."""
        with open(path, "w") as f:
            f.write(self.to_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: str) -> "SSTASchedule":
        """Read a schedule from JSON (a schedule dict, or a bare mask-strategy dict), or from a
        ``.safetensors`` file's metadata."""
        if str(path).endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return cls.from_metadata(f.metadata() or {})
        with open(path) as f:
            data = json.load(f)
        if data and all(_KEY.match(str(k)) for k in data):
            return cls.from_mask_strategy(data)
        return cls.from_dict(data)
