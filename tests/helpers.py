"""Test references: dense attention over expanded masks, golden-case loading, error metrics and
low-precision tolerances relative to PyTorch's own error."""

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


def load_script(filename: str, module_name: str | None = None):
    """``scripts/<filename>`` imported as a module (named ``module_name``, default its stem)."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", filename)
    spec = importlib.util.spec_from_file_location(module_name or filename.removesuffix(".py"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def assert_grads_match(out, inputs, ref, tol: float, ref_inputs=None) -> None:
    """Under one random cotangent, the gradients of ``out`` w.r.t. ``inputs`` equal those of ``ref``
    w.r.t. ``ref_inputs`` (default: the same inputs) within relative L2 ``tol``."""
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), inputs)
    exp = torch.autograd.grad((ref * g.to(ref.dtype)).sum(), inputs if ref_inputs is None else ref_inputs)
    for a, b in zip(got, exp):
        assert rel_l2(a, b) < tol


def dense_masked_attention(q, k, v, key_valid=None, scale=None):
    """float64 dense attention ``[B,H,S,D]`` where keys with ``key_valid [B,S] == False`` are excluded."""
    q, k, v = q.double(), k.double(), v.double()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if key_valid is not None:
        s = s.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def plan_token_mask(plan, batch: int, heads: int) -> torch.Tensor:
    """bool ``[B, H, Sq, Sk]``: the plan's kept blocks expanded to tokens, invalid keys excluded, and
    its token window (``lo <= j - (i + shift) <= hi``) applied when it has one."""
    mask = plan.to_dense().expand(batch, heads, -1, -1)
    mask = mask.repeat_interleave(plan.q_block, 2).repeat_interleave(plan.k_block, 3)
    mask = mask & plan.token_valid()[:, None, None, :] & plan.query_valid()[:, None, :, None]
    if plan.has_window:
        lo, hi = plan.window_bounds()
        dev = mask.device
        i = torch.arange(mask.shape[2], device=dev)[None, :] + plan.window_shift.to(dev).repeat_interleave(plan.q_block, 1)
        d = torch.arange(mask.shape[3], device=dev)[None, None, :] - i[:, :, None]          # [Bw, Sq, Sk]
        mask = mask & ((d >= lo) & (d <= hi))[:, None]
    return mask


def eager_attention(q, k, v, token_mask, scale=None, key_bias=None):
    """Dense masked attention computed in q's dtype, as plain PyTorch code would (no upcast): the
    yardstick of low-precision error. ``key_bias [B or 1, Sk]`` is added to the scaled scores. Rows with
    no key give 0 (and no gradient)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if key_bias is not None:
        s = s + key_bias.to(s.dtype)[:, None, None, :]
    s = s.masked_fill(~token_mask, torch.finfo(s.dtype).min)
    has_key = token_mask.any(-1, keepdim=True)
    return (torch.softmax(s, dim=-1) @ v) * has_key


def assert_within_eager_error(name, actual, exact, eager, factor: float = 2.0) -> float:
    """FlashAttention-style tolerance: ``max|actual - exact| <= factor * max|eager - exact| + floor``.

    ``exact`` is the float64 result; ``eager`` the same math in the low-precision dtype (`eager_attention`),
    so the bound is PyTorch's own error in that dtype. ``floor`` is twice the error of rounding
    ``exact`` to ``actual``'s dtype (what any result in that dtype must be allowed). Returns the error.
    """
    exact = exact.detach().double()
    err = float((actual.detach().double() - exact).abs().max())
    eager_err = float((eager.detach().double() - exact).abs().max())
    floor = 2 * float((exact.to(actual.dtype).double() - exact).abs().max())
    assert err <= factor * eager_err + floor, (
        f"{name}: max error {err:.3e} > {factor} x PyTorch {actual.dtype} error {eager_err:.3e} + {floor:.3e}")
    return err


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


def block_window_reference(q, k, v, mask, qb, kb, causal=False, window_size=(-1, -1)):
    """float64 attention of ``q [B,H,Sq,D]``, ``k, v [B,H_kv,Sk,D]`` over a block mask ``[.., Mq, Nk]``
    expanded to tokens and flash-attention's bottom-right aligned ``causal`` / ``window_size``.
    Returns ``(out, lse)``; rows that see no key: out 0, lse -inf."""
    Sq, Sk = q.shape[2], k.shape[2]
    H, Hk = q.shape[1], k.shape[1]
    k, v = (x.double().repeat_interleave(H // Hk, 1) for x in (k, v))
    tok = mask.repeat_interleave(qb, -2).repeat_interleave(kb, -1)[..., :Sq, :Sk].to(q.device)
    left, right = window_size
    right = 0 if causal else right
    d = torch.arange(Sk, device=q.device)[None, :] - torch.arange(Sq, device=q.device)[:, None] - (Sk - Sq)
    if left >= 0:
        tok = tok & (d >= -left)
    if right >= 0:
        tok = tok & (d <= right)
    s = (q.double() @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~tok, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - torch.where(torch.isinf(lse), 0, lse)[..., None]) @ v, lse
