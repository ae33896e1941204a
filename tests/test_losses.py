"""Losses against values computed by hand on tiny batches, and the memory bank."""

from __future__ import annotations

import math

import pytest
import torch

from sanitize.train.losses import (MAX_LOGIT_SCALE, MemoryBank, clamp_logit_scale_, clip_loss, cross_clip_loss,
                             info_nce, unimodal_loss)


def unit(*rows):
    t = torch.tensor(rows, dtype=torch.float64)
    return t / t.norm(dim=1, keepdim=True)


def ce(logits_row, target):
    """-log softmax(logits_row)[target], by hand."""
    return -(logits_row[target] - math.log(sum(math.exp(v) for v in logits_row)))


def test_clip_loss_matches_hand_computation():
    image = unit([1.0, 0.0], [0.0, 1.0])
    text = unit([1.0, 1.0], [0.0, 1.0])
    scale = 2.0
    s = 1 / math.sqrt(2)
    # logits[i][j] = scale * <image_i, text_j>
    logits = [[scale * s, 0.0], [scale * s, scale * 1.0]]
    rows = (ce(logits[0], 0) + ce(logits[1], 1)) / 2
    cols = (ce([logits[0][0], logits[1][0]], 0) + ce([logits[0][1], logits[1][1]], 1)) / 2
    expected = (rows + cols) / 2
    got = clip_loss(image, text, torch.tensor(scale, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_logit_scale_is_clamped_at_100():
    image, text = unit([1.0, 0.2], [0.3, 1.0]), unit([1.0, 0.0], [0.0, 1.0])
    huge = torch.tensor(1e4, dtype=torch.float64)
    assert clip_loss(image, text, huge).item() == pytest.approx(info_nce(image, text, 100.0).item())
    param = torch.nn.Parameter(torch.tensor(math.log(1e4)))
    clamp_logit_scale_(param)
    assert param.exp().item() == pytest.approx(MAX_LOGIT_SCALE, rel=1e-5)


def test_cross_clip_loss_pairs_image_view1_with_text_view2():
    i1, i2 = unit([1.0, 0.0], [0.0, 1.0]), unit([1.0, 0.5], [0.5, 1.0])
    t1, t2 = unit([0.0, 1.0], [1.0, 0.0]), unit([1.0, 0.1], [0.1, 1.0])
    scale = torch.tensor(1.0, dtype=torch.float64)
    got = cross_clip_loss(i1, i2, t1, t2, scale).item()
    assert got == pytest.approx((clip_loss(i1, t2, scale).item() + clip_loss(i2, t1, scale).item()) / 2)
    # and it is not the plain pairing
    assert got != pytest.approx((clip_loss(i1, t1, scale).item() + clip_loss(i2, t2, scale).item()) / 2)


def test_unimodal_in_batch_infonce_matches_hand_computation():
    v1 = unit([1.0, 0.0], [0.6, 0.8])
    v2 = unit([0.8, 0.6], [0.0, 1.0])
    tau = 0.5
    d = [[(v1[i] @ v2[j]).item() / tau for j in range(2)] for i in range(2)]
    forward = (ce(d[0], 0) + ce(d[1], 1)) / 2
    backward = (ce([d[0][0], d[1][0]], 0) + ce([d[0][1], d[1][1]], 1)) / 2
    assert unimodal_loss(v1, v2, tau).item() == pytest.approx((forward + backward) / 2, rel=1e-9)


def test_bank_is_fifo_and_wraps():
    bank = MemoryBank(3, 2)
    assert len(bank.entries()) == 0
    bank.push(torch.tensor([[1.0, 0], [2.0, 0]]))
    assert bank.entries()[:, 0].tolist() == [1.0, 2.0]
    bank.push(torch.tensor([[3.0, 0], [4.0, 0]]))  # 1 is the oldest: overwritten by 4
    assert bank.bank[:, 0].tolist() == [4.0, 2.0, 3.0]
    assert int(bank.filled) == 3 and int(bank.ptr) == 1
    bank.push(torch.tensor([[5.0, 0], [6.0, 0], [7.0, 0], [8.0, 0]]))  # more than fits: last 3 kept
    assert sorted(bank.bank[:, 0].tolist()) == [6.0, 7.0, 8.0]


def test_nearest_neighbour_is_the_max_inner_product_entry_in_any_chunking():
    bank = MemoryBank(4, 2)
    entries = unit([1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7]).float()
    bank.push(entries)
    queries = unit([0.9, 0.1], [-0.9, 0.1], [0.6, 0.8], [0.05, 1.0]).float()
    got = bank.nearest(queries)
    assert torch.equal(got, entries[[0, 2, 3, 1]])
    assert torch.equal(bank.nearest(queries, chunk=1), got)
    assert torch.equal(bank.nearest(queries, chunk=3), got)


def test_nearest_neighbour_is_exact_under_bf16_autocast():
    # GPUs train under bf16 autocast by default; 0.9990 and 0.9995 are the same bf16
    # number, so a bf16 product would tie and return the first entry.
    bank = MemoryBank(2, 2)
    entries = torch.tensor([[0.9990, 0.0], [0.9995, 0.0]])
    bank.push(entries)
    query = torch.tensor([[1.0, 0.0]])
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        assert (query @ entries.t()).dtype == torch.bfloat16  # the product autocast would take
        got = bank.nearest(query)
    assert torch.equal(got, entries[[1]])


def test_empty_bank_returns_the_queries_themselves():
    bank = MemoryBank(8, 2)
    q = unit([1.0, 2.0], [3.0, 1.0]).float()
    assert torch.equal(bank.nearest(q), q)


def test_nn_loss_uses_bank_neighbours_matches_hand_value_and_no_gradient_reaches_bank():
    bank = MemoryBank(2, 2)
    stored = unit([1.0, 0.0], [0.0, 1.0]).float()
    bank.push(stored)
    v1 = unit([0.9, 0.2], [0.1, 0.9]).float().requires_grad_()
    v2 = unit([0.2, 0.9], [1.0, 0.1]).float().requires_grad_()
    tau = 0.5
    loss = unimodal_loss(v1, v2, tau, bank)
    # neighbours: NN(v1) = stored rows (0, 1); NN(v2) = stored rows (1, 0)
    n1, n2 = stored, stored[[1, 0]]
    d1 = [[(n1[i] @ v2[j]).item() / tau for j in range(2)] for i in range(2)]
    d2 = [[(n2[i] @ v1[j]).item() / tau for j in range(2)] for i in range(2)]
    expected = ((ce(d1[0], 0) + ce(d1[1], 1)) / 2 + (ce(d2[0], 0) + ce(d2[1], 1)) / 2) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert v1.grad is not None and v2.grad is not None
    assert not bank.bank.requires_grad and bank.bank.grad is None
    assert list(dict(bank.named_parameters())) == []  # a buffer, never trained
    # view 1 was enqueued (FIFO, detached)
    assert torch.allclose(bank.entries(), v1.detach())
    assert not bank.entries().requires_grad
