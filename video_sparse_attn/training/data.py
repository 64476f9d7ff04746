"""Pre-encoded latent video datasets: one ``.safetensors`` file per sample.

Dataset format (a folder)::

    <root>/
      metadata.json             {"format": "video_sparse_attn.latents", "version": 1,
                                 "family": "hunyuan_video15" | "hunyuan_video" | "wan",
                                 "num_samples": N, "latent_shape": [C, T, H, W],
                                 "text_keys": [...], "scaling": "<how z was scaled>",
                                 ...free-form extras}
      samples/000000.safetensors
      samples/000001.safetensors
      ...

Each sample file holds these tensors (shapes without a batch dimension):

    latents          float [C, T, H, W]   VAE latents scaled as the family's pipeline expects
                                          (HunyuanVideo/-1.5: z·scaling_factor; Wan: (z−mean)/std),
                                          i.e. what the transformer denoises
    prompt_embeds    float [L, D]         main text encoder states (HunyuanVideo-1.5: Qwen2.5-VL,
                                          HunyuanVideo: Llama, Wan: umT5)
    prompt_mask      int64 [L]            1 = valid token, 0 = padding (valid tokens first)
    prompt_embeds_2  float [L2, D2]       optional second encoder (HunyuanVideo-1.5: ByT5)
    prompt_mask_2    int64 [L2]           optional, with prompt_embeds_2
    pooled_prompt_embeds float [P]        optional pooled text vector (HunyuanVideo: CLIP)

HunyuanVideo-1.5 training needs ``prompt_embeds_2``/``prompt_mask_2``; HunyuanVideo needs
``pooled_prompt_embeds``. ``prompt_mask`` must keep at least one token (``prompt_mask_2`` may be all
zero: HunyuanVideo-1.5's pipeline hands an empty ByT5 mask for prompts without quoted text).
Opening a dataset reads every sample's header and masks: a missing key, an empty ``prompt_mask`` or
a truncated file is named then; a sample holding NaN or inf is named when it is read. Files carry
string metadata (``caption``, ``source``: free text).
Samples of one batch must share the
latent shape; text lengths may differ (they are right-padded with mask 0 when batched).
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..cli import UsageError

__all__ = [
    "FORMAT_NAME", "REQUIRED_KEYS", "OPTIONAL_KEYS", "LatentVideoDataset", "collate_samples",
    "write_sample", "write_metadata", "make_synthetic_dataset", "read_metadata", "check_sample_header",
    "FAMILY_TEXT_KEYS", "DatasetError",
]

FORMAT_NAME = "video_sparse_attn.latents"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("latents", "prompt_embeds", "prompt_mask")
OPTIONAL_KEYS = ("prompt_embeds_2", "prompt_mask_2", "pooled_prompt_embeds")
_MASK_KEYS = ("prompt_mask", "prompt_mask_2")
FAMILY_TEXT_KEYS = {"hunyuan_video15": ("prompt_embeds_2", "prompt_mask_2"),
                    "hunyuan_video": ("pooled_prompt_embeds",)}   # needed beyond REQUIRED_KEYS
LATENT_SCALING = {
    "hunyuan_video15": "z * vae.config.scaling_factor",
    "hunyuan_video": "z * vae.config.scaling_factor",
    "wan": "(z - vae.config.latents_mean) / vae.config.latents_std",
}
_TEXT_PAIRS = (("prompt_embeds", "prompt_mask"), ("prompt_embeds_2", "prompt_mask_2"))


class DatasetError(UsageError):
    """A sample the training cannot use (named by its file); a `UsageError`, so a command reports it as
    one line."""


def _sample_path(root: str, index: int) -> str:
    return os.path.join(root, "samples", f"{index:06d}.safetensors")


def write_sample(root: str, index: int, tensors: Mapping[str, torch.Tensor],
                 metadata: Optional[Mapping[str, str]] = None) -> str:
    """Validate and write sample ``index`` under ``root``; returns the file path."""
    missing = [k for k in REQUIRED_KEYS if k not in tensors]
    unknown = sorted(set(tensors) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if missing or unknown:
        raise ValueError(f"sample {index}: missing keys {missing}, unknown keys {unknown}; "
                         f"required {REQUIRED_KEYS}, optional {OPTIONAL_KEYS}")
    if tensors["latents"].dim() != 4:
        raise ValueError(f"latents must be [C, T, H, W], got shape {tuple(tensors['latents'].shape)}")
    for emb, mask in _TEXT_PAIRS:
        if (emb in tensors) != (mask in tensors):
            raise ValueError(f"sample {index}: {emb} and {mask} come together")
        if emb in tensors and (tensors[emb].dim() != 2 or tensors[mask].shape != tensors[emb].shape[:1]):
            raise ValueError(f"sample {index}: {emb} must be [L, D] and {mask} [L]; got "
                             f"{tuple(tensors[emb].shape)} and {tuple(tensors[mask].shape)}")
    path = _sample_path(root, index)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    out = {k: (v.to(torch.int64) if k in _MASK_KEYS else v).detach().cpu().contiguous()
           for k, v in tensors.items()}
    save_file(out, path, metadata={str(k): str(v) for k, v in (metadata or {}).items()})
    return path


def write_metadata(root: str, family: str, num_samples: int, latent_shape: Sequence[int],
                   text_keys: Sequence[str], **extra) -> None:
    """Write ``metadata.json`` (see the module docstring)."""
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "family": family,
            "num_samples": int(num_samples), "latent_shape": [int(x) for x in latent_shape],
            "text_keys": list(text_keys), "scaling": LATENT_SCALING.get(family, "see the family's pipeline"),
            **extra}
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "metadata.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


class LatentVideoDataset(torch.utils.data.Dataset):
    """Reads a folder written by `write_sample` / `write_metadata`; items are dicts of tensors."""

    def __init__(self, root: str):
        meta_path = os.path.join(root, "metadata.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{root!r} is not a latent dataset: {meta_path} is missing "
                                    "(write one with scripts/make_latent_dataset.py)")
        self.root = root
        self.metadata: Dict = read_metadata(meta_path)
        samples = os.path.join(root, "samples")
        self.files: List[str] = sorted(
            os.path.join(samples, n) for n in (os.listdir(samples) if os.path.isdir(samples) else [])
            if n.endswith(".safetensors"))
        if not self.files:
            raise ValueError(f"{root!r} holds no samples/*.safetensors files")
        if len(self.files) != self.metadata["num_samples"]:
            raise ValueError(f"{meta_path}: num_samples is {self.metadata['num_samples']} but {samples} holds "
                             f"{len(self.files)} .safetensors files")
        # headers and masks only: cheap, and a truncated or unusable file is named before training
        self.text_widths: Dict[str, set] = {}
        self.latent_thws: set = set()
        for path in self.files:
            header = check_sample_header(path, self.metadata["latent_shape"][0], self.metadata["family"])
            self.latent_thws.add(tuple(header.pop("latents")[1:]))
            for key, width in header.items():
                self.text_widths.setdefault(key, set()).add(width)

    @property
    def family(self) -> str:
        return self.metadata["family"]

    @property
    def latent_shape(self) -> tuple:
        """[C, T, H, W] of the samples (the first sample's, if they differ)."""
        return tuple(self.metadata["latent_shape"])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        path = self.files[index]
        try:
            with safe_open(path, framework="pt") as f:
                sample = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error type
            raise DatasetError(f"sample file {path} cannot be read ({e}); it may be truncated or "
                               "corrupt") from e
        for key, t in sample.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise DatasetError(f"sample file {path}: {key} holds NaN or inf")
        return sample


def read_metadata(meta_path: str) -> Dict:
    """``metadata.json`` checked for format, version, num_samples and latent_shape (ValueError naming
    the file and the field)."""
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except ValueError as e:
        raise ValueError(f"{meta_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{meta_path}: format {got!r}, expected {FORMAT_NAME!r}")
    version = meta.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{meta_path}: version must be an int >= 1, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{meta_path}: dataset format version {version} is newer than this package reads "
                         f"({FORMAT_VERSION}); upgrade video_sparse_attn or rewrite the dataset")
    n = meta.get("num_samples")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{meta_path}: num_samples must be an int >= 1, got {n!r}")
    shape = meta.get("latent_shape")
    if not (isinstance(shape, list) and len(shape) == 4
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in shape)):
        raise ValueError(f"{meta_path}: latent_shape must be four positive ints [C, T, H, W], got {shape!r}")
    if "family" not in meta:
        raise ValueError(f"{meta_path}: no 'family' entry")
    return meta


def check_sample_header(path: str, channels: int, family: Optional[str] = None) -> Dict[str, object]:
    """Read one sample's header and text masks: readable (not truncated), the keys ``REQUIRED_KEYS``
    and ``family`` needs present, latents [C, T, H, W], each embedding [L, D] with a mask [L],
    ``prompt_mask`` keeping at least one token. Returns ``{"latents": [C, T, H, W], <embedding key>:
    width}`` (ValueError naming the file otherwise)."""
    try:
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            shapes = {k: list(f.get_slice(k).get_shape()) for k in keys}
            mask = f.get_tensor("prompt_mask") if "prompt_mask" in keys else None
    except Exception as e:  # safetensors raises its own error type
        raise ValueError(f"sample file {path} cannot be read ({e}); it may be truncated or corrupt") from e
    needed = REQUIRED_KEYS + FAMILY_TEXT_KEYS.get(family or "", ())
    missing = [k for k in needed if k not in keys]
    if missing:
        raise ValueError(f"sample file {path} lacks {missing} (required{f' for {family}' if family else ''}: "
                         f"{list(needed)})")
    latents = shapes["latents"]
    if len(latents) != 4 or latents[0] != channels:
        raise ValueError(f"sample file {path}: latents shape {latents}, expected [{channels}, T, H, W] "
                         "(metadata.json latent_shape)")
    widths: Dict[str, object] = {"latents": latents}
    for emb, mask_key in _TEXT_PAIRS:
        if emb not in keys and mask_key not in keys:
            continue
        if (emb in keys) != (mask_key in keys) or len(shapes.get(emb, ())) != 2 \
                or shapes[mask_key] != shapes[emb][:1]:
            raise ValueError(f"sample file {path}: {emb} must be [L, D] with {mask_key} [L]; got "
                             f"{shapes.get(emb)} and {shapes.get(mask_key)}")
        widths[emb] = shapes[emb][1]
    if "pooled_prompt_embeds" in keys:
        if len(shapes["pooled_prompt_embeds"]) != 1:
            raise ValueError(f"sample file {path}: pooled_prompt_embeds must be [P], got "
                             f"{shapes['pooled_prompt_embeds']}")
        widths["pooled_prompt_embeds"] = shapes["pooled_prompt_embeds"][0]
    if not bool((mask != 0).any()):
        raise ValueError(f"sample file {path}: prompt_mask has no valid token (every text position is "
                         "padding; the attention over the text has nothing to attend to)")
    return widths


def _pad_rows(t: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 0 of ``t`` to ``length``."""
    return torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, length - t.shape[0]))


def collate_samples(samples: Sequence[Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stack samples into a batch; text is right-padded (mask 0) to the longest in the batch."""
    keys = set(samples[0])
    if any(set(s) != keys for s in samples):
        raise ValueError(f"samples of one batch hold different keys: {[sorted(s) for s in samples]}")
    shapes = {tuple(s["latents"].shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"samples of one batch must share the latent shape; got {sorted(shapes)} "
                         "(use batch size 1 or bucket the dataset by shape)")
    batch = {"latents": torch.stack([s["latents"] for s in samples])}
    for emb, mask in _TEXT_PAIRS:
        if emb not in keys:
            continue
        length = max(s[emb].shape[0] for s in samples)
        batch[emb] = torch.stack([_pad_rows(s[emb], length) for s in samples])
        batch[mask] = torch.stack([_pad_rows(s[mask], length) for s in samples])
    if "pooled_prompt_embeds" in keys:
        batch["pooled_prompt_embeds"] = torch.stack([s["pooled_prompt_embeds"] for s in samples])
    return batch


def make_synthetic_dataset(root: str, num_samples: int, latent_shape: Sequence[int],
                           text_dim: int, text_len: int = 12, text_dim_2: Optional[int] = None,
                           text_len_2: int = 6, pooled_dim: Optional[int] = None,
                           family: str = "hunyuan_video15", seed: int = 0) -> str:
    """Write ``num_samples`` random samples (smooth latents, random text with ragged masks).

    ``latent_shape`` is [C, T, H, W]; ``text_dim``/``text_dim_2``/``pooled_dim`` must match the
    transformer's text inputs. Returns ``root``.
    """
    g = torch.Generator().manual_seed(seed)
    c, t, h, w = (int(x) for x in latent_shape)
    for i in range(num_samples):
        # low-frequency latents: a learnable signal, unlike white noise
        coarse = torch.randn(c, t, max(1, h // 2), max(1, w // 2), generator=g)
        latents = torch.nn.functional.interpolate(coarse[None], size=(t, h, w), mode="trilinear")[0]
        n_valid = int(torch.randint(max(1, text_len // 2), text_len + 1, (1,), generator=g))
        sample = {"latents": latents, "prompt_embeds": torch.randn(text_len, text_dim, generator=g),
                  "prompt_mask": (torch.arange(text_len) < n_valid).long()}
        if text_dim_2 is not None:
            n2 = int(torch.randint(1, text_len_2 + 1, (1,), generator=g))
            sample["prompt_embeds_2"] = torch.randn(text_len_2, text_dim_2, generator=g)
            sample["prompt_mask_2"] = (torch.arange(text_len_2) < n2).long()
        if pooled_dim is not None:
            sample["pooled_prompt_embeds"] = torch.randn(pooled_dim, generator=g)
        write_sample(root, i, sample, {"caption": f"synthetic sample {i}", "source": "synthetic"})
    text_keys = [k for k in ("prompt_embeds", "prompt_embeds_2", "pooled_prompt_embeds") if k in sample]
    write_metadata(root, family, num_samples, latent_shape, text_keys, synthetic=True, seed=seed,
                   text_dims=[text_dim, text_dim_2, pooled_dim])
    return root
