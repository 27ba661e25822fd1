"""The cooperative recipe (issue 3): terms, detached targets, Leader choice, learning on a fixed batch."""
from __future__ import annotations

import pytest
import torch

import coopnets
from coopnets.train import create_recipe
from coopnets.train.losses import ce, kd
from coopnets.train.recipes.cooperative import CooperativeConfig, build_leader

NUM_CLASSES = 3
TERMS = {"ce_full", "ce_sub", "kd_leader", "kd_self", "ce_leader", "kd_mutual"}


def _factory():
    return lambda: coopnets.wrap("test_resnet", num_classes=NUM_CLASSES)


def _batch(n: int = 8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def test_loss_is_the_weighted_sum_of_documented_terms():
    recipe = create_recipe("cooperative", _factory(), {"w_sub_ce": 0.5, "w_mutual_kd": 2.0})
    out = recipe(*_batch())
    assert set(out.terms) == TERMS and len(out.logits) == recipe.teammate_a.num_depths
    c = recipe.config
    expected = (out.terms["ce_full"] + c.w_sub_ce * out.terms["ce_sub"] + c.w_leader_kd * out.terms["kd_leader"]
                + c.w_self_kd * out.terms["kd_self"] + out.terms["ce_leader"] + c.w_mutual_kd * out.terms["kd_mutual"])
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_teammates_start_different_and_are_the_eval_models():
    recipe = create_recipe("cooperative", _factory())
    assert set(recipe.eval_models()) == {"teammate_a", "teammate_b"}
    a, b = recipe.teammate_a.state_dict(), recipe.teammate_b.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    assert recipe.deployable({"teammate_a": [0.5, 0.9], "teammate_b": [0.8, 0.8]}) == "teammate_b"


def test_distillation_targets_are_detached_leader_learns_only_from_labels():
    recipe = create_recipe("cooperative", _factory(), {"w_leader_ce": 0.0})
    recipe(*_batch()).loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in recipe.leader.parameters())
    assert any(p.grad is not None and p.grad.any() for p in recipe.teammate_a.parameters())


def test_mutual_kd_only_moves_the_student_side():
    only_mutual = {k: 0.0 for k in ("w_leader_ce", "w_sub_ce", "w_leader_kd", "w_self_kd")}
    recipe = create_recipe("cooperative", _factory(), only_mutual)
    a, b = recipe.teammate_a, recipe.teammate_b
    x, y = _batch()
    recipe(x, y).loss.backward()
    got = [p.grad.clone() for p in a.parameters()]
    recipe.zero_grad()
    # what A should learn: its labels at full depth + KD towards B's detached logits, depth by depth
    za, zb = a.forward_exits(x), b.forward_exits(x)
    c = recipe.config
    (ce(za[-1], y) + c.w_mutual_kd * sum(kd(s, t, c.temperature) for s, t in zip(za, zb))).backward()
    for g, p in zip(got, a.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_leader_defaults_to_the_teammate_backbone_and_is_selectable():
    teammate = coopnets.wrap("test_resnet", num_classes=NUM_CLASSES)
    default = build_leader(teammate)
    assert type(default) is type(teammate.backbone) and not hasattr(default, "exits")
    named = create_recipe("cooperative", _factory(), CooperativeConfig(leader="test_efficientnet")).leader
    assert type(named).__name__ == "EfficientNet" and named.num_classes == NUM_CLASSES


def test_loss_decreases_on_a_fixed_batch():
    recipe = create_recipe("cooperative", _factory())
    opt = torch.optim.SGD(recipe.parameters(), lr=0.05, momentum=0.9)
    x, y = _batch(16)
    losses = []
    for _ in range(12):
        loss = recipe(x, y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
