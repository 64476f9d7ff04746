"""Context-parallel plans and `enable_ulysses`: turn on diffusers' Ulysses parallelism for SSTA models.

diffusers 0.42.1 ships a ``_cp_plan`` for Wan and none for HunyuanVideo-1.5; `HUNYUAN_VIDEO15_CP_PLAN`
supplies one. It splits the video tokens (equal contiguous shards of the raster order; every rank
gets the same number of tokens, ``t*h*w / N``) and the rotary tables at the first double-stream
block and gathers them after ``proj_out``. The text stays whole on every rank: its length (e.g.
1,985 tokens at 720p) rarely divides by N, it is small next to the video, and each rank then takes
its heads of the text q/k/v without communication (`parallel.ulysses_attention`).
"""

from __future__ import annotations

from typing import Any, Optional
from unittest import mock

import torch

from ..families import family_of

__all__ = ["hunyuan_video15_cp_plan", "cp_plan_for", "enable_ulysses", "start_process_group"]


def hunyuan_video15_cp_plan() -> dict:
    """The context-parallel plan of ``HunyuanVideo15Transformer3DModel`` (see module docstring)."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    table = ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)   # rope: [n, D] cos, sin
    return {
        "rope": {0: table, 1: table},
        "transformer_blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


def cp_plan_for(transformer: torch.nn.Module) -> Optional[dict]:
    """The plan to pass to ``enable_parallelism``: ours for HunyuanVideo-1.5, the model's own for Wan."""
    family = family_of(transformer)
    if family.name == "hunyuan_video15":
        return hunyuan_video15_cp_plan()
    if family.name == "wan":
        return None   # diffusers' WanTransformer3DModel._cp_plan
    raise NotImplementedError("SSTA context parallelism supports HunyuanVideo-1.5 and Wan transformers")


def start_process_group() -> int:
    """Join the process group of a ``torchrun`` / ``accelerate launch`` run (NCCL with CUDA, else gloo)
    and pin this rank's GPU; returns the rank. A no-op when the group exists already."""
    import os

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count())))
    return dist.get_rank()


def enable_ulysses(target: Any, degree: int, mesh: Any = None) -> None:
    """``transformer.enable_parallelism`` with ``ContextParallelConfig(ulysses_degree=degree)`` and the
    plan of `cp_plan_for`, on a transformer or a pipeline's transformer(s). Call it after
    ``torch.distributed`` is initialised, before or after `enable_ssta`. ``mesh``: an optional
    ``DeviceMesh`` with dims ``("ring", "ulysses")`` of shape ``(1, degree)``. Without an accelerator
    (gloo on CPU) it builds a CPU mesh itself, as diffusers 0.42.1 assumes an accelerator there.

    Example (``torchrun --nproc_per_node 2``)::

        torch.distributed.init_process_group("nccl"); torch.cuda.set_device(local_rank)
        enable_ssta(pipe, SSTAConfig()); enable_ulysses(pipe, 2)
    """
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    from .enable import _transformers_of
    from .parallel import check_parallel_model

    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 2:
        raise ValueError(f"enable_ulysses: degree must be an int >= 2 (the number of processes sharing one "
                         f"video; without context parallelism skip the call), got {degree!r}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("enable_ulysses needs torch.distributed initialised first: call "
                           "torch.distributed.init_process_group(...) (or start_process_group()) in every rank")
    if mesh is None and degree != dist.get_world_size():
        raise ValueError(f"enable_ulysses: degree {degree} must equal the number of processes "
                         f"({dist.get_world_size()}): data parallelism on top of context parallelism is not "
                         "supported")
    if mesh is not None and mesh.size() != degree:
        raise ValueError(f"enable_ulysses: the mesh holds {mesh.size()} ranks, not degree {degree}")
    transformers = _transformers_of(target)
    for transformer in transformers:   # every check before the first change
        check_parallel_model(transformer, degree)
    on_cpu = torch.accelerator.device_count() == 0
    for transformer in transformers:
        cp_mesh = mesh or (_cpu_mesh(degree) if on_cpu else None)
        config = ContextParallelConfig(ulysses_degree=degree, mesh=cp_mesh)
        if on_cpu:   # diffusers computes rank % torch.accelerator.device_count()
            with mock.patch.object(torch.accelerator, "device_count", return_value=1):
                transformer.enable_parallelism(config=config, cp_plan=cp_plan_for(transformer))
        else:
            transformer.enable_parallelism(config=config, cp_plan=cp_plan_for(transformer))


def _cpu_mesh(degree: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (1, degree), mesh_dim_names=("ring", "ulysses"))
