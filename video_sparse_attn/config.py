"""`SSTAConfig`: every knob of Selective and Sliding Tile Attention, validated on construction.

Defaults are the values of the released HunyuanVideo-1.5 720p sparse checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple

__all__ = ["SSTAConfig"]

SPARSE_TYPES = ("ssta", "sta", "block_attn", "dense")
SAMPLING_TYPES = ("importance", "similarity")
PAD_TYPES = ("zero", "repeat", "mask")
METADATA_KEY = "ssta_config"

Triple = Tuple[int, int, int]

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _strict_bool(name: str, value: Any) -> bool:
    """A bool from True/False, 0/1 or the strings true/false/1/0/yes/no/on/off (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name} must be a boolean (true/false, 1/0), got {value!r}")


def _triple(name: str, value: Any) -> Triple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a sequence of three ints (t, h, w), got {value!r}")
    if any(isinstance(x, (str, bytes, bool)) for x in value):
        raise TypeError(f"{name} must hold ints, got {value!r}")
    try:
        out = tuple(int(x) for x in value)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of three ints (t, h, w), got {value!r}") from None
    if len(out) != 3 or any(x < 1 for x in out) or any(float(a) != float(b) for a, b in zip(out, value)):
        raise ValueError(f"{name} must be three positive ints (t, h, w), got {value!r}")
    return out  # type: ignore[return-value]


def _unit_float(name: str, value: Any) -> float:
    """A number in [0, 1] as a float (numeric strings from JSON / attn_param dicts accepted)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= out <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return out


def _mapping(what: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a mapping of names to values, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class SSTAConfig:
    """Selective and Sliding Tile Attention settings.

    Attributes:
        tile_thw: tile (= attention block) size in latent tokens along (t, h, w), any size; a tile
            whose volume is not a multiple of 16 is stored in a block rounded up to 16 slots, the
            tail masked. Default (6, 8, 8) = 384 tokens.
        kernel_thw: STA window in *tiles* along (t, h, w). Even sizes act like the next odd size;
            a window larger than the tile grid covers the whole axis.
        topk: key tiles selected per query tile by the importance / similarity scores.
        sparse_type: ``"ssta"`` (window ∪ top-k ∪ text), ``"sta"`` (window ∪ text),
            ``"block_attn"`` (top-k ∪ text) or ``"dense"`` (every block).
        sampling_type: ``"importance"`` (λ·similarity − (1−λ)·redundancy on normalised tile means)
            or ``"similarity"`` (raw dot product of tile means, optionally thresholded).
        lambda_: importance weight of similarity vs redundancy, in [0, 1].
        threshold: cumulative softmax mass that decides a per-row k (``similarity`` only; 0 = off).
        adaptive_pool: sub-cube pooling of tile representatives (``similarity`` only); None means
            plain tile means, or (2, 2, 2) when ``threshold > 0``.
        pad_type: value of padded video tokens: ``"zero"`` or ``"repeat"`` (copies of the last
            slice) keep them visible as keys, as the reference does (padding-free compute skips them
            and restores their exact effect: zero keys through the LSE, copies as a score bias ``log m``
            on the key they copy, where the backend has one); ``"mask"`` excludes padded video keys and
            invalid text keys token by token (exact: equals dense attention over real tokens when
            every block is kept).
        use_text_mask: apply the text-validity block rule when a text mask is given: in ``ssta`` (as
            the reference) and ``dense``; in ``sta`` / ``block_attn`` only with ``pad_type="mask"``
            (where it changes no output), otherwise their text blocks all stay visible.
        mask_share_within_head: one block mask for all heads (representatives averaged over heads).
        caller_rules: when resolving for a grid (`for_thw`), apply the HunyuanVideo-1.5 caller
            rules: topk halved when t <= 31, image tiles (1, 16, 24) and window (1, 1, 1) at t == 1.
    """

    tile_thw: Triple = (6, 8, 8)
    kernel_thw: Triple = (3, 3, 3)
    topk: int = 64
    sparse_type: str = "ssta"
    sampling_type: str = "importance"
    lambda_: float = 0.7
    threshold: float = 0.0
    adaptive_pool: Optional[Triple] = None
    pad_type: str = "zero"
    use_text_mask: bool = True
    mask_share_within_head: bool = False
    caller_rules: bool = field(default=True)

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("tile_thw", _triple("tile_thw", self.tile_thw))
        set_("kernel_thw", _triple("kernel_thw", self.kernel_thw))
        if self.adaptive_pool is not None:
            set_("adaptive_pool", _triple("adaptive_pool", self.adaptive_pool))
        if isinstance(self.topk, bool) or not isinstance(self.topk, int):
            raise TypeError(f"topk must be an int, got {type(self.topk).__name__}")
        if self.topk < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk}")
        for name, allowed in (("sparse_type", SPARSE_TYPES), ("sampling_type", SAMPLING_TYPES),
                              ("pad_type", PAD_TYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("lambda_", "threshold"):
            set_(name, _unit_float(name, getattr(self, name)))
        if self.threshold > 0 and self.sampling_type != "similarity":
            raise ValueError(
                f"threshold={self.threshold} needs sampling_type='similarity' "
                f"(got {self.sampling_type!r}); set threshold=0 for importance sampling"
            )
        if self.adaptive_pool is not None and self.sampling_type != "similarity":
            raise ValueError("adaptive_pool only applies with sampling_type='similarity'")
        if self.adaptive_pool is not None and any(
            p > t for p, t in zip(self.adaptive_pool, self.tile_thw)
        ):
            raise ValueError(f"adaptive_pool={self.adaptive_pool} is finer than tile_thw={self.tile_thw}")
        for name in ("use_text_mask", "mask_share_within_head", "caller_rules"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    # ------------------------------------------------------------------ derived values
    @property
    def block_size(self) -> int:
        """Tokens per tile (= attention block)."""
        return math.prod(self.tile_thw)

    @property
    def pool_thw(self) -> Optional[Triple]:
        """Sub-cube pooling actually used for the representatives (None = tile means)."""
        if self.sampling_type != "similarity":
            return None
        if self.adaptive_pool is not None:
            return self.adaptive_pool
        return (2, 2, 2) if self.threshold > 0 else None

    def as_dense(self) -> "SSTAConfig":
        """Every block kept and padding masked token by token: exact attention over the real tokens
        (what "dense" means in schedules and in a training warm-up)."""
        return self.replace(sparse_type="dense", pad_type="mask")

    def replace(self, **changes: Any) -> "SSTAConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def for_thw(self, thw: Tuple[int, int, int]) -> "SSTAConfig":
        """The config a caller runs at latent grid ``thw``.

        With ``caller_rules`` (the HunyuanVideo-1.5 pipeline's behaviour): ``topk`` is halved when
        ``t <= 31``; for images (``t == 1``) a 384-token tile becomes (1, 16, 24) and any other tile
        (1, Th, Tw·Tt) so that it keeps its volume, and the window becomes (1, 1, 1).
        Without ``caller_rules`` the config is returned unchanged.
        """
        t = _triple("thw", thw)[0]
        if not self.caller_rules:
            return self
        changes: dict = {}
        if t <= 31:
            changes["topk"] = max(1, self.topk // 2)
        if t == 1:
            tt, th, tw = self.tile_thw
            changes["tile_thw"] = (1, 16, 24) if self.block_size == 384 else (1, th, tw * tt)
            changes["kernel_thw"] = (1, 1, 1)
            if self.adaptive_pool is not None:
                changes["adaptive_pool"] = (1,) + tuple(self.adaptive_pool[1:])
        return self.replace(**changes, caller_rules=False) if changes else self.replace(caller_rules=False)

    # ------------------------------------------------------------------ HunyuanVideo-1.5 keys
    @classmethod
    def from_hunyuan(cls, attn_param: Mapping[str, Any]) -> "SSTAConfig":
        """Map a HunyuanVideo-1.5 ``attn_param`` dict onto a config (caller rules on).

        Known keys: ``attn_sparse_type``, ``ssta_topk``, ``tile_size``, ``win_size``,
        ``ssta_lambda``, ``ssta_sampling_type``, ``ssta_threshold``, ``ssta_adaptive_pool``,
        ``attn_pad_type``, ``attn_use_text_mask``, ``attn_mask_share_within_head``.
        Unknown keys raise, so a typo never silently falls back to a default.
        """
        mapping = {
            "attn_sparse_type": "sparse_type", "ssta_topk": "topk", "tile_size": "tile_thw",
            "win_size": "kernel_thw", "ssta_lambda": "lambda_", "ssta_sampling_type": "sampling_type",
            "ssta_threshold": "threshold", "ssta_adaptive_pool": "adaptive_pool",
            "attn_pad_type": "pad_type", "attn_use_text_mask": "use_text_mask",
            "attn_mask_share_within_head": "mask_share_within_head",
        }
        attn_param = _mapping("attn_param", attn_param)
        unknown = set(attn_param) - set(mapping)
        if unknown:
            raise ValueError(f"unknown HunyuanVideo-1.5 attn_param keys {sorted(unknown)}; known: {sorted(mapping)}")
        kwargs: dict = {}
        for key, value in attn_param.items():
            name = mapping[key]
            if name in ("tile_thw", "kernel_thw", "adaptive_pool") and value is not None:
                if isinstance(value, int):
                    value = (value, value, value)
                if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], (list, tuple)):
                    value = value[0]  # win_size is sometimes a list holding one triple
            if name == "sparse_type" and value in (None, "flash", "flash_attn", "dense"):
                value = "dense"
            if name in ("use_text_mask", "mask_share_within_head"):
                value = _strict_bool(key, value)
            if name == "threshold" and value is None:
                value = 0.0
            if name == "lambda_" and value is None:
                continue
            kwargs[name] = value
        return cls(**kwargs, caller_rules=True)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("tile_thw", "kernel_thw", "adaptive_pool"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SSTAConfig":
        d = _mapping("an SSTAConfig dict", d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown SSTAConfig fields {sorted(unknown)}")
        return cls(**dict(d))

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "SSTAConfig":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"an SSTAConfig must be a JSON object, and this is not JSON: {e}") from None
        return cls.from_dict(d)

    def save(self, path: str) -> None:
        """Write the config as JSON."""
        with open(path, "w") as f:
            f.write(self.to_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: str) -> "SSTAConfig":
        """Read a config from JSON, or from a ``.safetensors`` file's metadata."""
        if str(path).endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return cls.from_metadata(f.metadata() or {})
        with open(path) as f:
            return cls.from_json(f.read())

    def to_metadata(self) -> dict:
        """``{"ssta_config": json}`` for ``safetensors`` metadata (string values only)."""
        return {METADATA_KEY: self.to_json()}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> "SSTAConfig":
        if METADATA_KEY not in metadata:
            raise ValueError(f"metadata has no {METADATA_KEY!r} entry (keys: {sorted(metadata)})")
        return cls.from_json(metadata[METADATA_KEY])
