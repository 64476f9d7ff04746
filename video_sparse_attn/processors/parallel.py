"""SSTA under diffusers' Ulysses context parallelism.

Under ``ContextParallelConfig(ulysses_degree=N)`` each rank holds a shard of the video tokens (split by
the model's context-parallel plan; see `cp_plan`) and the whole text. Per attention call:

1. the video q/k/v ``[B, n/N, H, D]`` go through an all-to-all to ``[B, n, H/N, D]`` (whole sequence,
   this rank's heads); the text q/k/v ``[B, L, H, D]`` are replicated, so this rank takes its heads;
2. `ssta_attention` runs on ``[video | text]`` for those heads. Per-head masks need nothing more (the
   top-k is per head). Head-shared masks (``mask_share_within_head``) average tile means over all
   heads: the per-rank sums are all-reduced first, so every rank selects the same blocks as one
   process would;
3. the video output goes back through the inverse all-to-all, the text output is gathered over heads.

All exchanges are differentiable (`collectives`), so backward runs the usual kernels on the same
head slices. Ring attention is refused. `SSTAStats` on a rank record the density of that rank's heads.

Every rank must run the same forward: same input shapes and dtypes, text masks, timesteps and SSTA
settings. Before each transformer forward the grid hook compares a short signature of these over the
group (`check_parallel_forward`: one all-gather of a few integers and one host read), so a rank that
differs makes every rank raise the same error instead of deadlocking or mixing two computations in
the collectives. It does not run inside ``torch.compile`` (traced forwards skip it); a rank that fails
on its own before that point leaves the others waiting until the process group's timeout.
"""

from __future__ import annotations

import zlib
from typing import Optional

import torch

from ..attention import ssta_attention
from ..config import SSTAConfig
from ..layout import TileLayout
from .base import _local_ssta
from .collectives import all_reduce_sum, gather_heads, heads_to_seq, seq_to_heads

__all__ = ["ulysses_group", "ulysses_attention", "shares_head_means", "check_parallel_model",
           "check_parallel_forward"]

_RING = ("SSTA runs under Ulysses context parallelism only: use ContextParallelConfig(ulysses_degree=N) "
         "instead of ring_degree")
_ANYTHING = ("SSTA under Ulysses needs equal shards: use ContextParallelConfig(ulysses_degree=N) without "
             "ulysses_anything")


def ulysses_group(parallel_config):
    """The Ulysses process group of a diffusers ``ParallelConfig`` (or ``ContextParallelConfig``), or
    None when context parallelism is off or of degree 1. Refuses ring attention in one line."""
    cp = getattr(parallel_config, "context_parallel_config", parallel_config)
    if cp is None:
        return None
    if (getattr(cp, "ring_degree", 1) or 1) > 1:
        raise NotImplementedError(_RING)
    if getattr(cp, "ulysses_anything", False):
        raise NotImplementedError(_ANYTHING)
    if (getattr(cp, "ulysses_degree", 1) or 1) <= 1:
        return None
    mesh = getattr(cp, "_ulysses_mesh", None)
    if mesh is None:
        raise RuntimeError("the context-parallel config has no device mesh yet: call "
                           "transformer.enable_parallelism(config=...) before running the model")
    return mesh.get_group()


def check_parallel_model(transformer: torch.nn.Module, degree: int) -> None:
    """Refuse, in one line, a transformer SSTA cannot run under Ulysses degree ``degree``: a family
    without a context-parallel path, or attention heads that do not divide by the degree."""
    from .cp_plan import cp_plan_for

    cp_plan_for(transformer)   # refuses the families without a plan
    heads = getattr(getattr(transformer, "config", None), "num_attention_heads", None)
    if heads is not None and int(heads) % degree:
        raise ValueError(
            f"Ulysses degree {degree} splits the attention heads over the ranks, but "
            f"{type(transformer).__name__} has {heads} heads, which do not divide by {degree}: use a degree "
            f"that divides {heads}"
        )


_FIELDS = ("hidden_states shape", "hidden_states dtype", "shapes and dtypes of the other inputs",
           "values of the text masks, timesteps and other small inputs", "SSTA settings (config, schedule, backend)",
           "denoising step")


def _checksum(tensors: list, device: torch.device) -> torch.Tensor:
    """A position-weighted sum of the bytes of ``tensors`` (computed where they live; no host read)."""
    total = torch.zeros((), dtype=torch.int64, device=device)
    for i, x in enumerate(tensors):
        b = x.detach().contiguous().view(torch.uint8).reshape(-1).to(torch.int64)
        weights = torch.arange(1, b.numel() + 1, device=b.device, dtype=torch.int64) % 65521 + i + 1
        total = total + ((b * weights).sum() % 2_147_483_647).to(device)
    return total % 2_147_483_647


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def check_parallel_forward(transformer: torch.nn.Module, runtime, hidden_states: torch.Tensor, args: tuple,
                           kwargs: dict) -> None:
    """Checks before a forward of ``transformer`` under Ulysses context parallelism (called by the grid
    hook on every rank): a live process group, video tokens that split into equal shards, and the same
    inputs and SSTA settings on every rank of the group (see the module docstring)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{type(transformer).__name__} runs under context parallelism but this process has no "
            "torch.distributed process group (never initialised, or destroyed): call "
            "torch.distributed.init_process_group(...) in every rank before enable_ulysses and keep it until "
            "the last forward"
        )
    group = ulysses_group(transformer._parallel_config)
    if group is None:
        return
    degree = dist.get_world_size(group)
    t, h, w = runtime.thw
    if (t * h * w) % degree:
        raise ValueError(
            f"SSTA under Ulysses degree {degree} gives every rank an equal shard of the video tokens, but the "
            f"latent grid {(t, h, w)} holds {t * h * w} tokens, not a multiple of {degree}: choose frames, "
            f"height and width whose latent grid does"
        )
    if torch.compiler.is_compiling():
        return
    from .base import SSTAAttnProcessor

    others, small = [], []
    items = [(str(i), x) for i, x in enumerate(args)] + sorted(kwargs.items())
    for name, x in items:
        if not isinstance(x, torch.Tensor) or x is hidden_states:
            continue
        others.append(f"{name}:{tuple(x.shape)}:{x.dtype}")
        # integer inputs (masks) by value; of floats only tiny ones (timesteps), which every rank
        # computes alike: large embeddings from different GPUs are left out
        if not (x.is_floating_point() or x.is_complex()) or x.numel() <= 16:
            small.append(x)
    procs = {id(p): p for p in transformer.attn_processors.values() if isinstance(p, SSTAAttnProcessor)}
    settings = sorted(f"{p.config!r}|{p.schedule!r}|{p.backend}" for p in procs.values())
    uses_step = any(p.schedule is not None and p.schedule.uses_step for p in procs.values())
    host = [*hidden_states.shape, _crc(str(hidden_states.dtype)), _crc(";".join(others)), 0,
            _crc("\n".join(settings)), runtime.step if uses_step else 0]
    backend = dist.get_backend(group)
    device = torch.device("cpu") if backend == "gloo" else hidden_states.device
    mine = torch.tensor(host, dtype=torch.int64, device=device)
    mine[len(hidden_states.shape) + 2] = _checksum(small, device)
    rows = [torch.empty_like(mine) for _ in range(degree)]
    dist.all_gather(rows, mine, group=group)
    rows = [r.tolist() for r in rows]
    if all(r == rows[0] for r in rows):
        return
    nd = len(hidden_states.shape)
    spans = [(0, nd)] + [(nd + i, nd + i + 1) for i in range(len(_FIELDS) - 1)]
    differ = []
    for field, (a, b) in zip(_FIELDS, spans):
        values = [tuple(r[a:b]) if field == "hidden_states shape" else r[a] for r in rows]
        if len(set(values)) > 1:
            differ.append(f"{field} (per rank: {', '.join(map(str, values))})" if field in ("hidden_states shape", "denoising step")
                          else field)
    raise ValueError(
        f"the {degree} ranks of the Ulysses group called {type(transformer).__name__} with different inputs or "
        f"settings, which context parallelism cannot combine: they differ in {'; '.join(differ)}. Give every rank "
        "the same inputs (same seed, prompt and batch) and the same enable_ssta settings"
    )


def shares_head_means(config: SSTAConfig) -> bool:
    """Whether ``config`` selects blocks from tile means averaged over heads."""
    return config.mask_share_within_head and config.sparse_type in ("ssta", "block_attn")


def _ssta_shared_means(q, k, v, thw, config: SSTAConfig, text_len: int, text_mask, backend: str,
                       group_heads: int, group, want_info: bool):
    """`ssta_attention` for a head-shared mask whose heads are spread over ranks: the tile means of
    ``q, k [B, h, S, D]`` (this rank's h of the ``group_heads`` heads; h may be 0) are summed over
    ranks before the selection. Every rank must call it, in the same order. Returns ``(out, density)``
    (``(None, None)`` when h = 0)."""
    if config.pool_thw is not None:
        raise NotImplementedError("SSTA under Ulysses shares masks across heads only from plain tile means: "
                                  "use pool_thw=None or mask_share_within_head=False")
    layout = TileLayout(tuple(thw), config.tile_thw, text_len, config.pad_type)
    B, h, _, D = q.shape
    if h == 0:   # no local heads in this group: contribute zeros to the collective
        zeros = torch.zeros(2, B, 1, layout.num_video_blocks, D, device=q.device, dtype=torch.float32)
        all_reduce_sum(zeros, group)
        return None, None

    def global_means(q_means, k_means):   # [B, h, Nv, D] → the mean over every head of the group
        sums = torch.stack([q_means.sum(1, keepdim=True), k_means.sum(1, keepdim=True)])
        return (all_reduce_sum(sums, group) / group_heads).unbind(0)

    res = ssta_attention(q, k, v, thw, config, text_len, text_mask, backend=backend, return_info=want_info,
                         strict_tiles=False, tile_means_hook=global_means)
    return (res[0], res[1].density) if want_info else (res, None)


def _local_op(group):
    """The per-head-group op `SSTAAttnProcessor._attend_heads` calls on this rank's heads."""

    def op(q, k, v, thw, config, text_len, text_mask, backend, group_heads, want_info):
        if shares_head_means(config):
            return _ssta_shared_means(q, k, v, thw, config, text_len, text_mask, backend, group_heads,
                                      group, want_info)
        return _local_ssta(q, k, v, thw, config, text_len, text_mask, backend, group_heads, want_info)

    return op


def ulysses_attention(proc, runtime, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      text_len: int, text_mask: Optional[torch.Tensor], group) -> torch.Tensor:
    """SSTA of this rank's ``[video shard | whole text]`` q/k/v ``[B, n/N + L, H, D]``; returns the
    same layout. ``text_mask [B, L]`` is the whole (replicated) text mask."""
    import torch.distributed as dist

    n_ranks, rank = dist.get_world_size(group), dist.get_rank(group)
    B, s_local, H, D = query.shape
    n_local = s_local - text_len
    t, h, w = runtime.thw
    if H % n_ranks or n_local * n_ranks != t * h * w:
        raise ValueError(
            f"SSTA under Ulysses degree {n_ranks} expects each rank to hold 1/{n_ranks} of the {t * h * w} "
            f"video tokens of grid {tuple(runtime.thw)} (got {n_local}) and the whole text (L={text_len}), "
            f"with the heads ({H}) divisible by the degree; enable it with "
            "video_sparse_attn.processors.enable_ulysses"
        )
    hl = H // n_ranks
    heads = slice(rank * hl, (rank + 1) * hl)

    def gather(x):
        return torch.cat([seq_to_heads(x[:, :n_local], group), x[:, n_local:, heads]], dim=1)

    q, k, v = gather(query), gather(key), gather(value)                  # [B, n + L, H/N, D]
    out = proc._attend_heads(runtime, layer, q, k, v, text_len, text_mask, head_start=rank * hl,
                             num_heads=H, op=_local_op(group))           # [B, n + L, H/N, D]
    n = t * h * w
    video = heads_to_seq(out[:, :n], group)
    if not text_len:
        return video
    return torch.cat([video, gather_heads(out[:, n:], group)], dim=1)
