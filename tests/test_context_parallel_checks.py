"""Context parallelism refuses what it cannot run, in one line on every rank, and never deadlocks.

Two gloo processes run a list of scenarios in order: heads that do not divide by the degree (refused
by `enable_ulysses`), a latent grid that does not split into equal shards, ranks called with different
grids, SSTA settings or text masks (refused by the signature check before any collective; the group
stays usable afterwards), several resolutions in one group, `disable_ssta` under context parallelism
(Wan: stock processors that keep Ulysses; HunyuanVideo-1.5: refused), `enable_ssta` again with other
settings, and a destroyed process group.
Each rank records, per scenario, its output or its error; the parent compares them with one process.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from datetime import timedelta

import pytest
import torch

pytest.importorskip("diffusers")

from test_context_parallel import PER_HEAD, SHARED, tiny_model  # noqa: E402
from video_sparse_attn.processors import disable_ssta, enable_ssta, enable_ulysses  # noqa: E402

WORLD = 2
TIMEOUT_S = 90          # the whole run; a deadlock fails here instead of hanging the suite
GROUP_TIMEOUT_S = 30    # a collective left waiting by the other rank
GRIDS = ((3, 6, 8), (2, 4, 8))


def hv15_model(heads: int = 4):
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(0)
    return HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=8, num_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12,
        rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v").eval()


def hv15_inputs(grid, text_len: int = 11, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, text_len, dtype=torch.long)
    mask[0, 7:] = 0
    mask[1, 3:] = 0
    return dict(hidden_states=torch.randn(2, 4, *grid, generator=g), timestep=torch.tensor([500.0, 500.0]),
                encoder_hidden_states=torch.randn(2, text_len, 16, generator=g), encoder_attention_mask=mask,
                encoder_hidden_states_2=torch.randn(2, 5, 8, generator=g),
                encoder_attention_mask_2=torch.ones(2, 5, dtype=torch.long), image_embeds=torch.zeros(2, 3, 12))


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


# ---------------------------------------------------------------------------- scenarios (every rank)
def heads_not_divisible(rank):
    model = hv15_model(heads=3)
    enable_ssta(model, PER_HEAD, backend="torch")
    enable_ulysses(model, WORLD)            # must refuse here, before any forward
    return "enabled"


def grid_not_divisible(rank):
    model = hv15_model()
    enable_ssta(model, PER_HEAD, backend="torch")
    enable_ulysses(model, WORLD)
    return _forward(model, hv15_inputs((3, 5, 7)))   # 105 video tokens


def ranks_differ_in_grid(rank):
    model = hv15_model()
    enable_ulysses(model, WORLD)
    enable_ssta(model, PER_HEAD, backend="torch")
    return _forward(model, hv15_inputs(GRIDS[rank]))


def ranks_differ_in_config(rank):
    model = hv15_model()
    enable_ssta(model, (PER_HEAD, SHARED)[rank], backend="torch")   # the shared mask adds an all-reduce
    enable_ulysses(model, WORLD)
    return _forward(model, hv15_inputs(GRIDS[0]))


def ranks_differ_in_text_mask(rank):
    model = hv15_model()
    enable_ssta(model, PER_HEAD, backend="torch")
    enable_ulysses(model, WORLD)
    inputs = hv15_inputs(GRIDS[0])
    inputs["encoder_attention_mask"][0, : 9 + rank] = 1
    return _forward(model, inputs)


def several_grids(rank):
    model = hv15_model()
    enable_ssta(model, SHARED, backend="torch")
    enable_ulysses(model, WORLD)
    return [_forward(model, hv15_inputs(grid)) for grid in (*GRIDS, GRIDS[0])]


def wan_disable(rank):
    model, inputs = tiny_model("wan")
    enable_ssta(model, PER_HEAD, backend="torch")
    enable_ulysses(model, WORLD)
    _forward(model, inputs)
    disable_ssta(model)                      # stock processors back, still under Ulysses
    return _forward(model, inputs)


def hv15_disable(rank):
    model = hv15_model()
    enable_ssta(model, PER_HEAD, backend="torch")
    enable_ulysses(model, WORLD)
    disable_ssta(model)
    return _forward(model, hv15_inputs(GRIDS[0]))


def hv15_re_enable(rank):
    model = hv15_model()
    enable_ssta(model, PER_HEAD, backend="torch")
    enable_ulysses(model, WORLD)
    enable_ssta(model, SHARED, backend="torch")     # other settings (a fine-tuning sparsity ramp does this)
    return _forward(model, hv15_inputs(GRIDS[0]))


def destroyed_group(rank):
    import torch.distributed as dist

    model = hv15_model()
    enable_ssta(model, PER_HEAD, backend="torch")
    enable_ulysses(model, WORLD)
    dist.destroy_process_group()
    return _forward(model, hv15_inputs(GRIDS[0]))


SCENARIOS = [heads_not_divisible, grid_not_divisible, ranks_differ_in_grid, ranks_differ_in_config,
             ranks_differ_in_text_mask, several_grids, wan_disable, hv15_disable, hv15_re_enable, destroyed_group]   # last: no group


# ---------------------------------------------------------------------------- processes
def _child(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    results = {}
    try:
        for scenario in SCENARIOS:
            try:
                results[scenario.__name__] = ("ok", scenario(rank))
            except Exception as e:
                results[scenario.__name__] = ("error", f"{type(e).__name__}: {e}")
            if dist.is_initialized():
                dist.barrier()               # every rank is past the scenario before the next one
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    except Exception:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)   # as in test_context_parallel: no gloo teardown at exit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    import torch.multiprocessing as mp

    out_dir = str(tmp_path_factory.mktemp("cp_checks"))
    ctx = mp.start_processes(_child, args=(_free_port(), out_dir), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"context-parallel children did not finish in {TIMEOUT_S} s (a deadlock)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _error(outcomes, scenario: str) -> str:
    """The error every rank raised in ``scenario`` (the same one line on each)."""
    got = [o[scenario] for o in outcomes]
    assert all(kind == "error" for kind, _ in got), got
    lines = {msg for _, msg in got}
    assert len(lines) == 1, lines
    line = lines.pop()
    assert "\n" not in line
    return line


@pytest.mark.parametrize("scenario, message", [
    ("heads_not_divisible", "ValueError: Ulysses degree 2 splits the attention heads.*has 3 heads"),
    ("grid_not_divisible", r"ValueError: SSTA under Ulysses degree 2 .*\(3, 5, 7\) holds 105 tokens"),
    ("ranks_differ_in_grid", r"ValueError: the 2 ranks .*differ in hidden_states shape \(per rank: "
                             r"\(2, 4, 3, 6, 8\), \(2, 4, 2, 4, 8\)\)"),
    ("ranks_differ_in_config", "ValueError: the 2 ranks .*differ in SSTA settings"),
    ("ranks_differ_in_text_mask", "ValueError: the 2 ranks .*differ in values of the text masks"),
    ("hv15_disable", "RuntimeError: disable_ssta: this HunyuanVideo-1.5 transformer runs under context "
                     "parallelism"),
    ("destroyed_group", "RuntimeError: HunyuanVideo15Transformer3DModel runs under context parallelism but "
                        "this process has no torch.distributed process group"),
])
def test_refused_on_every_rank(outcomes, scenario, message):
    import re

    assert re.match(message, _error(outcomes, scenario))


def test_several_grids_in_one_group_match_one_process(outcomes):
    model = hv15_model()
    enable_ssta(model, SHARED, backend="torch")
    expected = [_forward(model, hv15_inputs(grid)) for grid in (*GRIDS, GRIDS[0])]
    for o in outcomes:
        kind, outs = o["several_grids"]
        assert kind == "ok", outs
        for got, want in zip(outs, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_wan_stock_processors_after_disable_keep_ulysses(outcomes):
    model, inputs = tiny_model("wan")
    expected = _forward(model, inputs)
    for o in outcomes:
        kind, out = o["wan_disable"]
        assert kind == "ok", out
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_re_enabling_hv15_under_ulysses_replaces_the_settings(outcomes):
    """``enable_ssta`` again under Ulysses used to go through `disable_ssta`, which refuses
    HunyuanVideo-1.5 there: new settings (a fine-tuning sparsity ramp with ``--cp``) were refused."""
    model = hv15_model()
    enable_ssta(model, SHARED, backend="torch")
    expected = _forward(model, hv15_inputs(GRIDS[0]))
    for o in outcomes:
        kind, out = o["hv15_re_enable"]
        assert kind == "ok", out
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_enable_ulysses_checks_its_arguments_first():
    model = hv15_model()
    for degree in (0, 1, 2.0, "2", True):
        with pytest.raises(ValueError, match="degree must be an int >= 2"):
            enable_ulysses(model, degree)
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised first"):
        enable_ulysses(model, 2)
    assert model._parallel_config is None
