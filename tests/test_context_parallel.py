"""SSTA under Ulysses context parallelism on CPU: 2 gloo processes vs one process.

Each child runs tiny HunyuanVideo-1.5 and Wan transformers through diffusers' own
``enable_parallelism`` (via `enable_ulysses`: our HunyuanVideo-1.5 plan, a gloo CPU mesh), forward and
backward, and sends back the output, the input gradient and the parameter gradients summed over
ranks. The parent compares them with a single-process run of the same models.
"""

from __future__ import annotations

import os
import sys
import socket
import time
import traceback

import pytest
import torch

pytest.importorskip("diffusers")

from video_sparse_attn import SSTAConfig  # noqa: E402
from video_sparse_attn.processors import SSTASchedule, enable_ssta, enable_ulysses  # noqa: E402
from video_sparse_attn.processors.parallel import ulysses_group  # noqa: E402

WORLD = 2
TIMEOUT_S = 120
PER_HEAD = SSTAConfig(tile_thw=(1, 2, 8), kernel_thw=(1, 1, 1), topk=2, caller_rules=False)
SHARED = SSTAConfig(tile_thw=(1, 2, 8), kernel_thw=(1, 1, 1), topk=2, mask_share_within_head=True,
                    caller_rules=False)
# head groups [0] and [1, 4): rank 1 holds none of the first, and the second spans both ranks
SPLIT_GROUPS = SSTASchedule(mask_strategy={"*_*_0": {"topk": 3}})
CASES = {   # name: (model, config, schedule)
    "hv15_per_head": ("hunyuan_video15", PER_HEAD, None),
    "hv15_shared": ("hunyuan_video15", SHARED, SPLIT_GROUPS),
    "wan_per_head": ("wan", PER_HEAD, None),
    "wan_shared": ("wan", SHARED, None),
}
CHECKPOINTED = ("hv15_shared", "wan_per_head")   # backward recomputes the blocks (and their exchanges)


# ---------------------------------------------------------------------------- tiny models
def tiny_model(name: str):
    """A tiny transformer (4 heads) and inputs whose latent grid splits into whole rows per rank."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "hunyuan_video15":
        from diffusers import HunyuanVideo15Transformer3DModel

        model = HunyuanVideo15Transformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=8, num_layers=2,
            num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12,
            rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v")
        mask = torch.ones(2, 11, dtype=torch.long)   # text length 11 + 5 + 3 = 19: odd, stays whole
        mask[0, 7:] = 0
        mask[1, 3:] = 0
        mask_2 = torch.ones(2, 5, dtype=torch.long)
        mask_2[1, 2:] = 0
        inputs = dict(hidden_states=torch.randn(2, 4, 3, 6, 8, generator=g),
                      timestep=torch.tensor([500.0, 500.0]),
                      encoder_hidden_states=torch.randn(2, 11, 16, generator=g), encoder_attention_mask=mask,
                      encoder_hidden_states_2=torch.randn(2, 5, 8, generator=g),
                      encoder_attention_mask_2=mask_2, image_embeds=torch.zeros(2, 3, 12))
    else:
        from diffusers import WanTransformer3DModel

        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
        inputs = dict(hidden_states=torch.randn(2, 4, 3, 12, 16, generator=g),
                      timestep=torch.tensor([500, 500]),
                      encoder_hidden_states=torch.randn(2, 12, 16, generator=g))
    return model.eval(), inputs


def tiny_case(case: str):
    model, inputs = tiny_model(CASES[case][0])
    if case in CHECKPOINTED:
        model.enable_gradient_checkpointing()
    return model, inputs


def forward_backward(model, inputs):
    """Output, input gradient and parameter gradients of a fixed linear loss on the output."""
    hidden = inputs["hidden_states"].clone().requires_grad_(True)
    out = model(**{**inputs, "hidden_states": hidden}, return_dict=False)[0]
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * weight).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), hidden.grad.detach(), grads


def run_case(case: str):
    _, config, schedule = CASES[case]
    model, inputs = tiny_case(case)
    runtime = enable_ssta(model, config, schedule, backend="torch", stats=True)
    return model, inputs, runtime


# ---------------------------------------------------------------------------- child process
def _child(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        for i, (case, (_, config, schedule)) in enumerate(CASES.items()):
            # our own gloo mesh for half the cases; enable_ulysses builds a CPU one for the others
            mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("ring", "ulysses")) if i < 2 else None
            model, inputs = tiny_case(case)
            if i % 2:   # both orders: parallelism before and after enable_ssta
                enable_ulysses(model, WORLD, mesh=mesh)
                enable_ssta(model, config, schedule, backend="torch")
            else:
                enable_ssta(model, config, schedule, backend="torch")
                enable_ulysses(model, WORLD, mesh=mesh)
            out, hidden_grad, grads = forward_backward(model, inputs)
            for g in [hidden_grad, *grads.values()]:
                dist.all_reduce(g)   # each rank's copy holds its part of the gradient
            results[case] = (out, hidden_grad, grads)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "cp.pt"))
        dist.barrier()          # every rank is done with every collective
    except Exception:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        sys.stderr.write(traceback.format_exc())
        sys.stderr.flush()
        os._exit(1)
    # Leave without tearing the gloo group down: its C++ threads can abort the process at exit
    # ("terminate called without an active exception") after all the work is done and saved.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(out_dir: str, attempts: int = 2) -> None:
    """Run the children; a child killed by a signal before any Python error (gloo's C++ threads
    aborting the process, no error file written) is run once more, a Python error never."""
    import torch.multiprocessing as mp

    for attempt in range(attempts):
        ctx = mp.start_processes(_child, args=(_free_port(), out_dir), nprocs=WORLD, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    pytest.fail(f"context-parallel children did not finish in {TIMEOUT_S} s")
            return
        except mp.ProcessExitedException as e:
            python_error = any(name.startswith("error") for name in os.listdir(out_dir))
            if python_error or e.signal_name is None or attempt == attempts - 1:
                raise
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()


# ---------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def parallel_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("cp"))
    _spawn(out_dir)
    return torch.load(os.path.join(out_dir, "cp.pt"))


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("case", list(CASES))
def test_ulysses_matches_one_process(parallel_results, case):
    model, inputs, runtime = run_case(case)
    out, hidden_grad, grads = forward_backward(model, inputs)
    # the case compares sparse attention (blocks dropped), not dense attention in disguise
    assert all(float(r.density) < 0.9 for r in runtime.stats.records)
    cp_out, cp_hidden_grad, cp_grads = parallel_results[case]
    assert _rel(cp_out, out) < 1e-5
    assert _rel(cp_hidden_grad, hidden_grad) < 1e-5
    assert cp_grads.keys() == grads.keys()
    # a key bias has a zero gradient up to rounding (softmax is shift-invariant): skip such noise
    worst = max(_rel(cp_grads[n], grads[n]) for n in grads if grads[n].norm() > 1e-6)
    assert worst < 1e-4


class _Config:
    def __init__(self, ring=1, ulysses=2, anything=False):
        self.ring_degree, self.ulysses_degree, self.ulysses_anything = ring, ulysses, anything
        self._ulysses_mesh = None


def test_ring_and_uneven_shards_are_refused():
    model, _ = tiny_model("wan")
    model._parallel_config = type("Parallel", (), {"context_parallel_config": _Config(ring=2, ulysses=1)})()
    with pytest.raises(NotImplementedError, match="Ulysses"):
        enable_ssta(model, PER_HEAD)
    with pytest.raises(NotImplementedError, match="Ulysses"):
        ulysses_group(_Config(ring=2, ulysses=1))
    with pytest.raises(NotImplementedError, match="ulysses_anything"):
        ulysses_group(_Config(anything=True))
    assert ulysses_group(None) is None
    assert ulysses_group(_Config(ulysses=1)) is None
