"""The plan → FlashAttention-4 block-list conversion, checked on the CPU against a dense construction."""

import dataclasses

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


def _assert_lists(lists, full, part):
    """FA4's forward lists hold the full / mask sub-block pairs ``[B, H, Rq, Rk]``, the backward lists the same transposed."""
    Rq, Rk = full.shape[-2:]
    m_cnt, m_idx, f_cnt, f_idx = lists.fwd
    assert torch.equal(_dense(f_cnt, f_idx, Rk).expand_as(full), full)
    assert torch.equal(_dense(m_cnt, m_idx, Rk).expand_as(part), part)
    mb_cnt, mb_idx, fb_cnt, fb_idx = lists.bwd
    assert torch.equal(_dense(fb_cnt, fb_idx, Rq).expand_as(full.transpose(-1, -2)), full.transpose(-1, -2))
    assert torch.equal(_dense(mb_cnt, mb_idx, Rq).expand_as(part.transpose(-1, -2)), part.transpose(-1, -2))


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
    _assert_lists(lists, full, part)
    m_cnt, m_idx, f_cnt, f_idx = lists.fwd
    mb_cnt, mb_idx, fb_cnt, fb_idx = lists.bwd
    for t in lists.fwd + lists.bwd:
        assert t.dtype == torch.int32 and t.is_contiguous()
    # ids ascending within each list (FA4 walks them in order)
    for cnt, idx in ((f_cnt, f_idx), (m_cnt, m_idx), (fb_cnt, fb_idx), (mb_cnt, mb_idx)):
        ok = torch.arange(idx.shape[-1] - 1) < (cnt[..., None] - 1)
        assert (idx[..., 1:] > idx[..., :-1])[ok].all()
    assert lists.key_ok.shape == (B, Nk * kb) and torch.equal(lists.key_ok.bool(), plan.token_valid().expand(B, -1))
    assert fa4_block_lists(plan, B) is lists                                      # cached on the plan


@pytest.mark.parametrize("window", [False, True])
def test_backward_lists_built_only_when_asked(window):
    """``backward=False`` leaves ``bwd`` None (a forward without gradients does not build it); asking
    for it later adds the same lists a full conversion gives to the cached forward lists."""
    torch.manual_seed(5)
    mask = torch.rand(2, 3, 4, 6) < 0.5
    k_valid = torch.randint(0, 385, (2, 6), dtype=torch.int32)
    kw = {"window_lo": -300, "window_hi": 200} if window else {}
    plan = BlockSparsePlan.from_block_mask(mask, 384, 384, k_valid, **kw)
    fwd_only = fa4_block_lists(plan, 2, backward=False)
    assert fwd_only.bwd is None
    assert fa4_block_lists(plan, 2, backward=False) is fwd_only                    # cached
    both = fa4_block_lists(plan, 2)
    assert both.bwd is not None and all(a is b for a, b in zip(both.fwd, fwd_only.fwd))
    fresh = fa4_block_lists(dataclasses.replace(plan), 2, cache=False)
    for a, b in zip(both.fwd + both.bwd, fresh.fwd + fresh.bwd):
        assert torch.equal(a, b)
    assert fa4_block_lists(plan, 2, backward=False) is both                        # both cached now


def _expected_from_tokens(plan, batch):
    """Sub-block classes (mask, full) [B, H', Rq, Rk] from the dense token mask, by brute force: a pair
    is live when some valid row sees some key, full when every valid row sees all 128 keys."""
    Sq, Sk = plan.num_q_blocks * plan.q_block, plan.num_k_blocks * plan.k_block
    tok = plan.to_dense().repeat_interleave(plan.q_block, -2).repeat_interleave(plan.k_block, -1)
    tok = tok & plan.token_valid()[:, None, None, :]
    shift = plan.window_shift.repeat_interleave(plan.q_block, -1)                  # [Bs, Sq]
    d = torch.arange(Sk)[None, None, :] - (torch.arange(Sq)[None, :, None] + shift[:, :, None])
    if plan.window_lo is not None:
        tok = tok & (d >= plan.window_lo)[:, None]
    if plan.window_hi is not None:
        tok = tok & (d <= plan.window_hi)[:, None]
    tok = tok.expand(batch, -1, -1, -1)
    rows = plan.query_valid().expand(batch, -1)[:, None, :, None]
    Rq, Rk = Sq // FA4_BLOCK, Sk // FA4_BLOCK
    live = (tok & rows).view(batch, -1, Rq, FA4_BLOCK, Rk, FA4_BLOCK).any(5).any(3)
    every = (tok | ~rows).view(batch, -1, Rq, FA4_BLOCK, Rk, FA4_BLOCK).all(5).all(3)
    full = every & rows.view(batch, 1, Rq, FA4_BLOCK, 1).any(3)
    Mq, Nk = plan.num_q_blocks, plan.num_k_blocks
    seen = (tok & rows).view(batch, -1, Mq, plan.q_block, Nk, plan.k_block).any(5).any(3)   # per plan block
    return live & ~full, full, seen


@pytest.mark.parametrize("qb, kb", [(128, 128), (256, 384), (384, 128)])
@pytest.mark.parametrize("window", [(None, 0), (None, 200), (-300, 0), (-130, 70), (5, None)])
def test_window_lists_equal_token_mask_classes(qb, kb, window):
    """Causal / sliding windows (with per-block shifts, ragged rows and keys): FA4's mask and full
    lists are the sub-blocks the dense token mask makes partial and complete."""
    torch.manual_seed(qb + kb + (window[0] or 0))
    B, H, Mq, Nk = 2, 2, 4, 3
    mask = torch.rand(1, H, Mq, Nk) < 0.7
    k_valid = torch.full((B, Nk), kb, dtype=torch.int32)
    k_valid[:, -1] = torch.randint(1, kb + 1, (B,))                  # ragged last key block
    q_valid = torch.full((B, Mq), qb, dtype=torch.int32)
    q_valid[:, -1] = torch.randint(0, qb + 1, (B,))                  # ragged (or empty) last query block
    shift = torch.randint(-200, 200, (B, Mq), dtype=torch.int32)
    shift[0] = 0
    plan = BlockSparsePlan.from_block_mask(mask, qb, kb, k_valid, q_valid, *window, shift)
    lists = fa4_block_lists(plan, B, cache=False)
    part, full, seen = _expected_from_tokens(plan, B)
    _assert_lists(lists, full, part)
    assert part.any()                         # the window cuts through some sub-blocks
    # the mask_mod's per-row bounds: row i sees keys lo[i]..hi[i]
    lo, hi = lists.row_bounds
    pos = torch.arange(Mq * qb) + plan.window_shift.repeat_interleave(qb, -1)
    w_lo, w_hi = plan.window_bounds()
    assert torch.equal(lo, (pos + w_lo).expand(B, -1)) and torch.equal(hi, (pos + w_hi).expand(B, -1))
    # blocks wholly outside the window were dropped from the plan itself (batch 0: no shift)
    assert torch.equal(plan.to_dense()[0] & (q_valid[0] > 0)[None, :, None], seen[0])


def test_causal_lists_skip_blocks_above_the_diagonal():
    """Dense causal over 4 x 4 sub-blocks: the diagonal is masked, below it full, above it absent."""
    plan = BlockSparsePlan.from_block_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), 256, 256, window_hi=0)
    m_cnt, m_idx, f_cnt, f_idx = fa4_block_lists(plan, 1, cache=False).fwd
    part, full = _dense(m_cnt, m_idx, 4)[0, 0], _dense(f_cnt, f_idx, 4)[0, 0]
    assert torch.equal(part, torch.eye(4, dtype=torch.bool))
    assert torch.equal(full, torch.ones(4, 4, dtype=torch.bool).tril(-1))


@pytest.mark.parametrize("qb, kb", [(384, 384), (256, 128)])
def test_unwindowed_lists_equal_the_windowed_classification(qb, kb):
    """The per-block fast path (no window) lists exactly what the per-sub-block classification lists
    for a window that excludes nothing."""

    torch.manual_seed(qb + kb)
    B, Mq, Nk = 2, 6, 5
    mask = torch.rand(1, 3, Mq, Nk) < 0.5
    plan = BlockSparsePlan.from_block_mask(mask, qb, kb, torch.randint(0, kb + 1, (B, Nk), dtype=torch.int32),
                                           torch.randint(0, qb + 1, (1, Mq), dtype=torch.int32))
    fast = fa4_block_lists(plan, B, cache=False)
    wide = fa4_block_lists(dataclasses.replace(plan, window_lo=-(10 ** 9), window_hi=10 ** 9), B, cache=False)

    def listed(cnt, idx):
        return torch.where(torch.arange(idx.shape[-1]) < cnt[..., None], idx, -1)

    for a, b in ((fast.fwd, wide.fwd), (fast.bwd, wide.bwd)):
        for i in (0, 2):
            assert torch.equal(a[i].expand_as(b[i]), b[i])
            assert torch.equal(listed(a[i], a[i + 1]).expand_as(listed(b[i], b[i + 1])), listed(b[i], b[i + 1]))
