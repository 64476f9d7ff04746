"""Compiling kernel variants without launching them (`kernels.precompile`), CPU only."""

import inspect
import os
import subprocess
import sys

import pytest
import torch

pc = pytest.importorskip("video_sparse_attn.kernels.precompile")


class Stub:
    """Stands in for a Triton kernel: records whether it was launched or only compiled."""

    def __init__(self):
        self.calls = []

    def warmup(self, *args, grid, **kwargs):
        self.calls.append(("warmup", grid, args, kwargs))

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(("run", grid, args, kwargs))


def test_launch_compiles_only_inside_compile_only():
    k = Stub()
    pc.launch(k, (2, 1), 1, X=3)
    with pc.compile_only():
        assert pc.compiling_only()
        pc.launch(k, (2, 1), 1, X=3)
        assert pc.empty(4, 5, dtype=torch.float32).is_meta and pc.zeros(3).is_meta
        assert pc.empty_like(torch.ones(2, 3).t()).stride() == (1, 3)          # strides kept, no memory
    assert not pc.compiling_only()
    assert [c[0] for c in k.calls] == ["run", "warmup"] and k.calls[1][1:] == ((2, 1), (1,), {"X": 3})
    assert not pc.empty(2).is_meta and pc.zeros(2).eq(0).all()


def _recorded_backward(monkeypatch, deterministic, options=None):
    from video_sparse_attn.kernels.triton_common import resolve_kernel_options
    from video_sparse_attn.warmup import _plan

    names = []

    def launch(kernel, grid, *args, **kwargs):
        assert pc.compiling_only()
        fn = getattr(getattr(kernel, "tuner", None), "fn", kernel)
        names.append((getattr(fn, "__name__", None) or fn.fn.__name__, kwargs.get("DQ_MODE")))
        real = [a for a in args if isinstance(a, torch.Tensor) and not a.is_meta]
        assert all(any(a is t for t in inputs) for a in real)      # every buffer (out, dout, dq, dQ acc...) is meta

    monkeypatch.setattr(pc, "launch", launch)
    plan = _plan(100, 32, 16, "cpu")
    q = torch.randn(1, 2, 128, 16)
    k = torch.randn(1, 2, 112, 16)
    inputs = [q, k, *(getattr(plan, f) for f in ("kv_count", "kv_index", "q_count", "q_index", "row_order",
                                                "col_order", "k_valid", "q_valid", "window_shift"))]
    pc.precompile_backward(q, k, k, plan, 0.25, resolve_kernel_options(options), deterministic)
    return names


def test_backward_variants_are_enumerated_by_the_launch_code(monkeypatch):
    assert _recorded_backward(monkeypatch, False) == [
        ("_delta_kernel", None), ("_dkdv_kernel", 1), ("_dq_convert_kernel", None)]
    assert _recorded_backward(monkeypatch, True) == [("_delta_kernel", None), ("_dkdv_kernel", 0), ("_dq_kernel", None)]


def test_wait_drops_background_errors_and_never_waits_inside_compile_only():
    def boom():
        raise RuntimeError("compile failed")

    pc.submit(boom, torch.device("cpu"))
    with pc.compile_only():
        pc.wait()                          # the background compile runs the backward's own code: no self-wait
        assert pc._pending
    pc.wait()                              # joined; its error is the real launch's to report
    assert not pc._pending


@pytest.mark.interpreter
def test_async_precompile_is_a_no_op_off_gpu_and_a_call_still_works():
    from video_sparse_attn.kernels.triton_op import block_sparse_attention_triton
    from video_sparse_attn.warmup import _plan

    plan = _plan(100, 32, 16, "cpu")
    q = torch.randn(1, 2, 128, 16, requires_grad=True)
    k = torch.randn(1, 2, 112, 16, requires_grad=True)
    v = torch.randn(1, 2, 112, 16, requires_grad=True)
    seen = set(pc._seen)
    pc.precompile_backward_async(q, k, v, plan, 0.25, {}, False)
    assert pc._seen == seen and not pc._pending                      # nothing submitted for CPU tensors
    out, lse = block_sparse_attention_triton(q, k, v, plan, kernel_options={"autotune": False})
    out.sum().backward()
    assert not pc._pending and torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def _kernels():
    from video_sparse_attn.kernels import triton_bwd, triton_fwd, triton_gather
    from video_sparse_attn.kernels.triton_common import SHAPE_ARGS_M, SHAPE_ARGS_N

    return [(triton_fwd._fwd_kernel, SHAPE_ARGS_M), (triton_bwd._dq_kernel, SHAPE_ARGS_M),
            (triton_bwd._dkdv_kernel, SHAPE_ARGS_N), (triton_bwd._delta_kernel, ["H"]),
            (triton_bwd._dq_convert_kernel, ["H"]),
            (triton_gather._gather_rows_kernel, ["H", "R", "num_mean_groups", "mean_group0"])]


def test_unspecialised_arguments_exist_and_exclude_the_row_count():
    # Triton ignores unknown names in do_not_specialize silently: a renamed argument would specialise again
    for kernel, names in _kernels():
        params = list(inspect.signature(kernel.fn).parameters)
        assert set(names) <= set(params), (kernel.fn.__name__, set(names) - set(params))
        assert "Sq" not in names


def test_compiled_kernels_do_not_specialise_on_shape_arguments():
    # the interpreter drops do_not_specialize, so look at the compiled JIT functions in a fresh process
    code = (
        "from video_sparse_attn.kernels import triton_fwd as f, triton_bwd as b, triton_gather as g\n"
        "for k in (f._fwd_kernel, b._dkdv_kernel, b._dq_kernel, b._delta_kernel, b._dq_convert_kernel,"
        " g._gather_rows_kernel):\n"
        "    print(k.fn.__name__, *sorted(p.name for p in k.params if p.do_not_specialize))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = {line.split()[0]: set(line.split()[1:]) for line in res.stdout.splitlines()}
    for kernel, names in _kernels():
        assert got[kernel.fn.__name__] == set(names), kernel.fn.__name__


def test_warmup_refuses_a_tile_whose_block_is_not_the_shapes():
    """A warm-up shape with 384-token blocks and a 2x4x4 tile (32-token blocks) would warm the wrong
    kernels: one clear line, before any device work."""
    from video_sparse_attn.warmup import warmup

    with pytest.raises(ValueError, match=r"the SSTA tile \(2, 4, 4\) makes blocks of 32 tokens, not the shape's 384"):
        warmup((1, 2, 1000, 64, torch.float32, 384), tile=(2, 4, 4), device="cpu")
