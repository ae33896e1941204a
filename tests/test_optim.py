"""Learning-rate schedule endpoints and AdamW weight-decay groups."""

from __future__ import annotations

import pytest
import torch

from sanitize.models.factory import create_model
from sanitize.train.optim import lr_at, make_optimizer, param_groups


def test_warmup_rises_linearly_to_base_lr():
    base, warm, total = 1e-3, 4, 20
    lrs = [lr_at(s, total, base, warm) for s in range(warm + 1)]
    assert lrs[0] == pytest.approx(base / (warm + 1))
    assert lrs[warm] == pytest.approx(base)
    steps = [b - a for a, b in zip(lrs, lrs[1:])]
    assert all(d == pytest.approx(steps[0]) for d in steps)  # linear


def test_cosine_ends_exactly_at_min_lr_on_the_last_step():
    base, total = 5e-4, 37
    for warm in (0, 5):
        for min_lr in (0.0, 1e-5):
            lrs = [lr_at(s, total, base, warm, min_lr) for s in range(total)]
            assert lrs[-1] == min_lr  # exactly, not approximately
            assert lrs[-2] > min_lr
            decay = lrs[warm:]
            assert all(a >= b for a, b in zip(decay, decay[1:]))  # monotone: never past pi
            assert lr_at(total + 10, total, base, warm, min_lr) == min_lr
    assert lr_at(0, total, base, 0) == base
    # half-way through the decay the cosine is at the mean of base and min
    assert lr_at(18, total, base, 0) == pytest.approx(base / 2)


def test_schedule_rejects_empty_runs_and_handles_one_step():
    with pytest.raises(ValueError):
        lr_at(0, 0, 1e-3)
    assert lr_at(0, 1, 1e-3, warmup_steps=10) == 1e-3


def test_no_weight_decay_on_norms_biases_logit_scale_and_1d_embeddings():
    torch.manual_seed(0)
    model, *_ = create_model("safeclip-tiny-vit")
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    by_id = {id(p): n for n, p in model.named_parameters()}
    no_decay = {by_id[id(p)] for p in groups["no_decay"]["params"]}
    decay = {by_id[id(p)] for p in groups["decay"]["params"]}
    assert no_decay.isdisjoint(decay)
    assert no_decay | decay == {n for n, _ in model.named_parameters()}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    assert "logit_scale" in no_decay
    assert "visual.class_embedding" in no_decay
    assert "ln_final.weight" in no_decay and "ln_final.bias" in no_decay
    assert any(n.endswith("attn.in_proj_bias") for n in no_decay)
    assert "visual.conv1.weight" in decay and "text_projection" in decay
    assert "token_embedding.weight" in decay  # 2-D embeddings decay, as in open_clip's trainer
    assert all(model.get_parameter(n).ndim >= 2 for n in decay)

    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.2)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.9, 0.999)
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 0.2]
