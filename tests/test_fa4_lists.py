"""The plan → FlashAttention-4 block-list conversion, checked on the CPU against a dense construction."""

import pytest
import torch

from video_sparse_attn import BlockSparsePlan
from video_sparse_attn.kernels.fa4 import FA4_BLOCK, fa4_block_lists


def _dense(cnt, idx, width):
    """bool [B, H, R, width] from (count [B, H, R], ids [B, H, R, W]) lists."""
    slots = torch.arange(idx.shape[-1]) < cnt[..., None]
    out = torch.zeros(*cnt.shape, width + 1, dtype=torch.bool)
    return out.scatter_(-1, torch.where(slots, idx.long(), width), True)[..., :width]


def _expected(plan, batch):
    """Dense sub-block masks (full, masked) [B, H', Mq*rq, Nk*rk] built the obvious way."""
    rq, rk = plan.q_block // FA4_BLOCK, plan.k_block // FA4_BLOCK
    m = plan.to_dense()
    sub = m.repeat_interleave(rq, -2).repeat_interleave(rk, -1).expand(batch, -1, -1, -1)
    starts_k = torch.arange(rk) * FA4_BLOCK
    kv = (plan.k_valid[..., None] - starts_k).clamp(0, FA4_BLOCK).flatten(-2).expand(batch, -1)
    qv = (plan.q_valid[..., None] - torch.arange(rq) * FA4_BLOCK).clamp(0, FA4_BLOCK).flatten(-2).expand(batch, -1)
    live = sub & (qv > 0)[:, None, :, None] & (kv > 0)[:, None, None, :]
    full = live & (kv == FA4_BLOCK)[:, None, None, :]
    return full, live & ~full


@pytest.mark.parametrize("qb, kb", [(128, 128), (384, 384), (256, 384), (384, 128)])
@pytest.mark.parametrize("broadcast", [False, True])
def test_lists_equal_dense_construction(qb, kb, broadcast):
    torch.manual_seed(qb + kb + broadcast)
    B, H, Mq, Nk = 2, 3, 5, 7
    Bp, Hp = (1, 1) if broadcast else (B, H)
    mask = torch.rand(Bp, Hp, Mq, Nk) < 0.45
    mask[..., 0, :] = True
    mask[..., 1, :] = False
    k_valid = torch.randint(0, kb + 1, (B, Nk), dtype=torch.int32)
    k_valid[:, 0] = kb
    q_valid = torch.randint(0, qb + 1, (1 if broadcast else B, Mq), dtype=torch.int32)
    plan = BlockSparsePlan.from_block_mask(mask, qb, kb, k_valid, q_valid)
    lists = fa4_block_lists(plan, B)
    full, part = _expected(plan, B)
    Rq, Rk = full.shape[-2:]
    m_cnt, m_idx, f_cnt, f_idx = lists.fwd
    assert torch.equal(_dense(f_cnt, f_idx, Rk).expand_as(full), full)
    assert torch.equal(_dense(m_cnt, m_idx, Rk).expand_as(part), part)
    mb_cnt, mb_idx, fb_cnt, fb_idx = lists.bwd
    assert torch.equal(_dense(fb_cnt, fb_idx, Rq).expand_as(full.transpose(-1, -2)), full.transpose(-1, -2))
    assert torch.equal(_dense(mb_cnt, mb_idx, Rq).expand_as(part.transpose(-1, -2)), part.transpose(-1, -2))
    for t in lists.fwd + lists.bwd:
        assert t.dtype == torch.int32 and t.is_contiguous()
    # ids ascending within each list (FA4 walks them in order)
    for cnt, idx in ((f_cnt, f_idx), (m_cnt, m_idx), (fb_cnt, fb_idx), (mb_cnt, mb_idx)):
        ok = torch.arange(idx.shape[-1] - 1) < (cnt[..., None] - 1)
        assert (idx[..., 1:] > idx[..., :-1])[ok].all()
    assert lists.key_ok.shape == (B, Nk * kb) and torch.equal(lists.key_ok.bool(), plan.token_valid().expand(B, -1))
    assert fa4_block_lists(plan, B) is lists                                      # cached on the plan
