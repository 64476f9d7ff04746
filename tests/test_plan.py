"""BlockSparsePlan: compression, transposes, schedules, k_valid, broadcasting."""

import pytest
import torch

from video_sparse_attn import BlockSparsePlan


@pytest.mark.parametrize("shape", [(2, 3, 7, 5), (1, 1, 4, 4), (3, 1, 1, 9), (1, 2, 6, 1)])
def test_round_trip_and_transpose(shape):
    mask = torch.rand(shape) < 0.4
    mask[..., 0, :] = False  # an empty row
    plan = BlockSparsePlan.from_block_mask(mask, 32, 16)
    assert torch.equal(plan.to_dense(), mask)
    assert torch.equal(plan.kv_count, mask.sum(-1).int()) and torch.equal(plan.q_count, mask.sum(-2).int())
    assert plan.kv_index.dtype == torch.int32 and plan.kv_index.shape == shape
    for idx, cnt, m in ((plan.kv_index, plan.kv_count, mask), (plan.q_index, plan.q_count, mask.transpose(-1, -2))):
        for pos in torch.nonzero(torch.ones(m.shape[:-1])).tolist():
            c = int(cnt[tuple(pos)])
            row = idx[tuple(pos)].tolist()
            assert row[:c] == torch.nonzero(m[tuple(pos)]).flatten().tolist()   # ascending kept ids
            assert all(r == (row[c - 1] if c else 0) for r in row[c:])        # padding repeats a valid id
    # heavy rows first
    counts = torch.gather(plan.kv_count, -1, plan.row_order.long())
    assert (counts[..., :-1] >= counts[..., 1:]).all()
    assert float(plan.density) == pytest.approx(float(mask.float().mean()))


def test_k_valid_and_block_checks():
    mask = torch.ones(1, 1, 2, 3, dtype=torch.bool)
    plan = BlockSparsePlan.from_block_mask(mask, 16, 32, torch.tensor([[32, 40, 5]]))
    assert plan.k_valid.tolist() == [[32, 32, 5]]
    assert plan.token_valid().shape == (1, 96) and int(plan.token_valid().sum()) == 69
    with pytest.raises(ValueError, match="multiples of 16"):
        BlockSparsePlan.from_block_mask(mask, 24)
    with pytest.raises(TypeError, match="bool"):
        BlockSparsePlan.from_block_mask(mask.int(), 16)
    with pytest.raises(ValueError, match="k_valid"):
        BlockSparsePlan.from_block_mask(mask, 16, 16, torch.ones(1, 2, dtype=torch.int32))


def test_dense_plan_and_repr():
    plan = BlockSparsePlan.dense(2, 3, 4, 5, 64)
    assert plan.to_dense().all() and plan.shape == (2, 3, 4, 5)
    assert "Mq=4" in repr(plan) and "k_block=64" in repr(plan)
    assert plan.to_string().splitlines()[0] == "#####"
    assert torch.equal(plan.to("cpu").to_dense(), plan.to_dense())
    moved = plan.to("meta")
    assert moved is not plan and moved.device.type == "meta" and plan.device.type == "cpu"  # a copy
    assert moved.shape == plan.shape and (moved.q_block, moved.k_block) == (plan.q_block, plan.k_block)
    assert all(getattr(moved, n).device.type == "meta" for n in ("kv_index", "q_index", "k_valid", "q_valid"))


def test_compact_compiled_equals_eager():
    """`compact` under torch.compile (a sort, not a scan) equals its eager form, expanded values too."""
    from video_sparse_attn.plan import compact

    torch.manual_seed(0)
    keep = torch.rand(2, 3, 5, 37) < 0.4
    keep[0, 0, 0] = False                      # an empty row
    keep[1, 2, 4] = True                       # a full row
    values = (torch.arange(37, dtype=torch.int32) * 3)[None, None, None].expand(2, 3, 5, 37)
    c_eager, v_eager = compact(values, keep)
    c_comp, v_comp = torch.compile(compact, backend="aot_eager", fullgraph=True)(values, keep)
    assert torch.equal(c_eager, c_comp) and torch.equal(v_eager, v_comp)
    assert int(c_eager[1, 2, 4]) == 37 and int(c_eager[0, 0, 0]) == 0
