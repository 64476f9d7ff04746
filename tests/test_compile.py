"""`torch.compile(fullgraph=True)` through SSTA on CPU (backend ``aot_eager``, SSTA backend ``torch``):
the custom op, `ssta_attention`, tiny Wan as a whole model and the HunyuanVideo models' repeated blocks.
Compiled forward and backward equal eager; a new latent grid compiles once more, cleanly.

SSTA specializes on the latent grid (the tile layout's sizes follow from it), so the tests compile with
``dynamic=False``; the default automatic-dynamic mode compiles the same graphs after one symbolic retrace.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from video_sparse_attn import BlockSparsePlan, SSTAConfig, ssta_attention
from video_sparse_attn.kernels import torch_op, torch_ref
from video_sparse_attn.plan import TENSOR_FIELDS

SPARSE = SSTAConfig(tile_thw=(1, 4, 4), kernel_thw=(1, 1, 1), topk=2, caller_rules=False)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _plan(key_bias=False):
    mask = torch.rand(2, 1, 4, 5) < 0.5
    mask[0, 0, 1] = False                                                   # a query block with no key
    return BlockSparsePlan.from_block_mask(mask, 16, 16, torch.tensor([[16, 16, 16, 7, 16]]),
                                           q_valid=torch.tensor([[16, 16, 16, 9]]),
                                           key_bias=torch.rand(2, 80) * 3 if key_bias else None)


def _grads(fn, inputs, cotangents):
    inputs = [x.detach().requires_grad_() for x in inputs]
    outs = fn(*inputs)
    grads = torch.autograd.grad(outs, inputs, cotangents)
    return [o.detach() for o in outs], grads


# ---------------------------------------------------------------------------- the custom op
@pytest.mark.parametrize("key_bias", [False, True], ids=["plain", "key_bias"])
def test_custom_op_equals_reference_forward_and_backward(key_bias):
    plan = _plan(key_bias)
    q = torch.randn(2, 2, 64, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 2, 80, 8, dtype=torch.float64).unbind(0)
    d_out = torch.randn(2, 2, 64, 8, dtype=torch.float64)
    d_lse = torch.randn(2, 2, 64)
    for cot in ((d_out,), (d_out, d_lse)):   # with and without a gradient through lse
        n = len(cot)
        ref, ref_g = _grads(lambda *x: torch_ref.block_sparse_attention_torch(*x, plan, 0.3)[:n], (q, k, v), cot)
        out, g = _grads(lambda *x: torch_op.block_sparse_attention_torch_op(*x, plan, 0.3)[:n], (q, k, v), cot)
        for a, b in zip(out + list(g), ref + list(ref_g)):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    tensors = [getattr(plan, n) for n in TENSOR_FIELDS]
    op = torch.ops.vsa.block_sparse_attention_torch.default
    torch.library.opcheck(op, (q, k, v, tensors, plan.key_bias, 16, 16, None, None, 0.3))
    torch.library.opcheck(op, (q, k, v, tensors, plan.key_bias, 16, 16, -5, 3, 0.3))


@pytest.mark.parametrize("key_bias", [False, True], ids=["plain", "key_bias"])
def test_plan_is_a_pytree_that_crosses_the_compile_boundary(key_bias):
    import torch.utils._pytree as pytree

    plan = _plan(key_bias)
    leaves, spec = pytree.tree_flatten(plan)
    assert len(leaves) == len(TENSOR_FIELDS) + key_bias and all(isinstance(x, torch.Tensor) for x in leaves)
    rebuilt = pytree.tree_unflatten(leaves, spec)
    assert (rebuilt.q_block, rebuilt.k_block) == (16, 16) and torch.equal(rebuilt.to_dense(), plan.to_dense())
    assert (rebuilt.key_bias is None) != key_bias
    cnt = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(lambda q, k, v, p: torch_op.block_sparse_attention_torch_op(q, k, v, p)[0], fullgraph=True,
                       backend=cnt)
    q, k = torch.randn(2, 2, 64, 8), torch.randn(2, 2, 80, 8)
    torch.testing.assert_close(fn(q, k, k, plan), torch_ref.block_sparse_attention_torch(q, k, k, plan)[0],
                               rtol=1e-6, atol=1e-6)
    assert cnt.frame_count == 1


# ---------------------------------------------------------------------------- ssta_attention
CONFIGS = {
    "ssta_importance": SPARSE,
    "block_attn_threshold_mask_pad": SSTAConfig(tile_thw=(2, 4, 4), topk=3, sparse_type="block_attn",
                                                sampling_type="similarity", threshold=0.5, pad_type="mask",
                                                caller_rules=False),
    "ssta_pooled_shared_repeat": SSTAConfig(tile_thw=(2, 4, 4), kernel_thw=(1, 3, 3), topk=2, adaptive_pool=(1, 2, 2),
                                            sampling_type="similarity",
                                            mask_share_within_head=True, pad_type="repeat", caller_rules=False),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_ssta_attention_compiles_fullgraph(name):
    config = CONFIGS[name]
    cnt = CompileCounterWithBackend("aot_eager")

    def attention(q, k, v, thw, text_mask):
        return (ssta_attention(q, k, v, thw, config, text_mask.shape[1], text_mask, backend="torch"),)

    compiled = torch.compile(attention, fullgraph=True, dynamic=False, backend=cnt)
    first = name == "ssta_importance"        # backward and a second grid (one more graph) for one config
    for i, thw in enumerate([(3, 6, 8), (2, 8, 9)] if first else [(3, 6, 8)]):
        L = 7
        q, k, v = torch.randn(3, 2, 2, thw[0] * thw[1] * thw[2] + L, 16).unbind(0)
        text_mask = torch.arange(L)[None] < torch.tensor([[7], [3]])
        if not first:
            with torch.no_grad():
                torch.testing.assert_close(compiled(q, k, v, thw, text_mask)[0],
                                           attention(q, k, v, thw, text_mask)[0], rtol=1e-5, atol=1e-6)
            continue
        d_out = (torch.randn_like(q),)
        out, grads = _grads(lambda *x: compiled(*x, thw, text_mask), (q, k, v), d_out)
        ref, ref_grads = _grads(lambda *x: attention(*x, thw, text_mask), (q, k, v), d_out)
        torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert cnt.frame_count == i + 1
    assert cnt.frame_count == (2 if first else 1)


# ---------------------------------------------------------------------------- whole transformers
def _fwd_bwd(module, params, inputs):
    for p in params.values():
        p.grad = None
    out = module(**inputs)[0]
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in params.items() if p.grad is not None}


def _assert_same(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-6)
    assert len(grads_a) > 10
    for name in grads_a.keys() | grads_b.keys():   # a compiled block gives zeros where eager gives None
        a, b = grads_a.get(name), grads_b.get(name)
        a, b = (torch.zeros_like(b) if a is None else a), (torch.zeros_like(a) if b is None else b)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def _compiled_family(family, num_layers=None):
    pytest.importorskip("diffusers")
    from video_sparse_attn import enable_ssta
    from video_sparse_attn.testing import tiny_model

    model = tiny_model(family, **({} if num_layers is None else {"num_layers": num_layers})).train()
    enable_ssta(model, SPARSE, backend="torch")
    return model, CompileCounterWithBackend("aot_eager")


@pytest.mark.slow
def test_wan_whole_model_fullgraph():
    from video_sparse_attn.testing import tiny_inputs

    model, cnt = _compiled_family("wan", num_layers=1)
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=cnt)
    params = dict(model.named_parameters())
    inputs = tiny_inputs(model, (3, 12, 16))
    _assert_same(_fwd_bwd(compiled, params, inputs), _fwd_bwd(model, params, inputs))
    assert cnt.frame_count == 1
    other = tiny_inputs(model, (2, 16, 16))                   # a new grid: one more graph
    with torch.no_grad():
        torch.testing.assert_close(compiled(**other)[0], model(**other)[0], rtol=1e-5, atol=1e-6)
    assert cnt.frame_count == 2


@pytest.mark.slow
@pytest.mark.parametrize("family", ["hunyuan_video15", "hunyuan_video"])
def test_hunyuan_repeated_blocks_fullgraph(family):
    from video_sparse_attn.testing import tiny_inputs

    model, cnt = _compiled_family(family)
    params = dict(model.named_parameters())
    inputs = tiny_inputs(model, (3, 6, 8))
    eager = _fwd_bwd(model, params, inputs)
    model.compile_repeated_blocks(fullgraph=True, dynamic=False, backend=cnt)
    _assert_same(_fwd_bwd(model, params, inputs), eager)
    compiled_frames = cnt.frame_count
    assert compiled_frames >= 1
    if family != "hunyuan_video15":   # a new grid is checked once per way of compiling (Wan: whole model)
        return
    other = tiny_inputs(model, (2, 8, 8))
    with torch.no_grad():
        out = model(**other)[0]
        with torch.compiler.set_stance("force_eager"):
            ref = model(**other)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert cnt.frame_count > compiled_frames
