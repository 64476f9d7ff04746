"""Test references: dense attention over expanded masks, golden-case loading, error metrics."""

from __future__ import annotations

import glob
import json
import math
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from video_sparse_attn import SSTAConfig

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def dense_masked_attention(q, k, v, key_valid=None, scale=None):
    """float64 dense attention ``[B,H,S,D]`` where keys with ``key_valid [B,S] == False`` are excluded."""
    q, k, v = q.double(), k.double(), v.double()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if key_valid is not None:
        s = s.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def golden_cases():
    return sorted(glob.glob(os.path.join(GOLDEN_DIR, "*.safetensors")))


def load_golden(path):
    """(tensors, params, config) of one golden file."""
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        params = json.loads(f.metadata()["params"])
    config = SSTAConfig(
        tile_thw=params["tile"], kernel_thw=params["kernel"], topk=params["topk"],
        sparse_type=params["sparse_type"], sampling_type=params["sampling"],
        lambda_=0.7 if params["lam"] is None else params["lam"], threshold=params["thr"],
        pad_type=params["pad"], mask_share_within_head=params["share"], caller_rules=False,
    )
    return tensors, params, config
