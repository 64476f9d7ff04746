"""Backend registry: `auto` picks by capability; a named backend runs or raises one line."""

import dataclasses

import pytest
import torch

from video_sparse_attn.kernels import registry
from video_sparse_attn.kernels.registry import AttentionCall, select_backend


@pytest.fixture
def gpu(monkeypatch):
    """Pretend a CUDA device of a chosen compute capability, with every extra importable."""
    cap = {"major": 9}
    monkeypatch.setattr(registry, "_capability", lambda device: (cap["major"], 0))
    for name in ("fa4", "triton"):
        monkeypatch.setitem(registry.BACKENDS, name,
                            dataclasses.replace(registry.BACKENDS[name], importable=lambda: None))
    return cap


def _call(dtype=torch.bfloat16, D=128, block=384, device="cuda", **kw):
    return AttentionCall(torch.device(device), dtype, D, block, block, **kw)


def test_auto_order_follows_capabilities(gpu):
    assert select_backend("auto", _call()).name == "fa4"
    assert select_backend("auto", _call(D=64, block=128)).name == "fa4"
    assert select_backend("auto", _call(dtype=torch.float32)).name == "triton"     # fa4: half types only
    assert select_backend("auto", _call(D=96)).name == "triton"                     # fa4: D 64 / 128
    assert select_backend("auto", _call(block=48)).name == "triton"                 # fa4: 128-token blocks
    assert select_backend("auto", _call(deterministic=True)).name == "triton"       # fa4: no deterministic bwd
    assert select_backend("auto", _call(window=True)).name == "fa4"                 # causal / window: mask_mod
    assert select_backend("auto", _call(dtype=torch.float64)).name == "torch"
    assert select_backend("auto", _call(D=512)).name == "torch"
    gpu["major"] = 8                                                                 # Ampere: no fa4
    assert select_backend("auto", _call()).name == "triton"
    gpu["major"] = 7                                                                 # Volta: torch only
    assert select_backend("auto", _call()).name == "torch"


def test_auto_without_extras_falls_to_what_is_installed(monkeypatch):
    monkeypatch.setattr(registry, "_capability", lambda device: (9, 0))
    for name in ("fa4", "triton"):
        monkeypatch.setitem(registry.BACKENDS, name,
                            dataclasses.replace(registry.BACKENDS[name], importable=lambda: "not installed"))
    assert select_backend("auto", _call()).name == "torch"
    with pytest.raises(ValueError, match=r"^backend 'fa4' cannot run this call: not installed$"):
        select_backend("fa4", _call())


def test_cpu_tensors_run_the_torch_backend():
    assert select_backend("auto", _call(device="cpu")).name == "torch"


def test_named_backend_never_falls_back(gpu, monkeypatch):
    for call, pattern in [
        (_call(dtype=torch.float32), "fa4.*runs float16/bfloat16, got torch.float32"),
        (_call(D=96), "fa4.*head dims 64..128 \\(multiples of 64\\), got head dim 96"),
        (_call(block=48), "fa4.*multiples of 128, got q_block=48"),
        (_call(deterministic=True), "fa4.*no deterministic backward"),
    ]:
        with pytest.raises(ValueError, match=pattern) as e:
            select_backend("fa4", call)
        assert "\n" not in str(e.value)
    gpu["major"] = 8
    with pytest.raises(ValueError, match=r"fa4.*compute capability 9.x/10.x, this GPU is 8.x"):
        select_backend("fa4", _call())
    monkeypatch.setattr(registry, "_interpreting", lambda: False)
    with pytest.raises(ValueError, match="triton.*needs CUDA tensors"):
        select_backend("triton", _call(device="cpu"))
    with pytest.raises(ValueError, match="backend must be one of \\('auto', 'fa4', 'triton', 'torch'\\)"):
        select_backend("flash", _call())


def test_processor_check_names_the_fix():
    from video_sparse_attn.processors import check_backend_support

    with pytest.raises(ValueError, match="backend='torch'"):
        check_backend_support(torch.randn(1, 1, 16, 8, dtype=torch.float64), "triton")
    assert check_backend_support(torch.randn(1, 1, 16, 8, dtype=torch.float64), "auto") == "torch"


def test_key_bias_is_a_capability(gpu):
    """A plan with a per-key score bias runs only on a backend that adds it (torch, Triton); FA4 refuses
    it in one line, and `auto` passes over it."""
    from video_sparse_attn import BlockSparsePlan

    assert select_backend("auto", _call(key_bias=True)).name == "triton"
    with pytest.raises(ValueError, match=r"^backend 'fa4' cannot run this call: it does not add a per-key score "
                                         r"bias \(plan\.key_bias\)$") as e:
        select_backend("fa4", _call(key_bias=True))
    assert "\n" not in str(e.value)
    assert select_backend("torch", _call(key_bias=True)).name == "torch"
    plan = BlockSparsePlan.from_block_mask(torch.ones(1, 1, 1, 1, dtype=torch.bool), 16, key_bias=torch.zeros(16))
    q = torch.empty(1, 1, 16, 8)
    assert AttentionCall.of(q, plan).key_bias
    assert not AttentionCall.of(q, dataclasses.replace(plan, key_bias=None)).key_bias
    assert [n for n, s in registry.BACKENDS.items() if s.key_bias] == ["triton", "torch"]
