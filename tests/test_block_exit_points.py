"""``exit_points="blocks"``: an exit head after every block (MLCSD-Net's 8 exits on ResNet-18)."""
from __future__ import annotations

from typing import List

import pytest
import torch
from timm.models import group_parameters
from torch import nn

import coopnets
from coopnets.inference.early_exit import confidence_score
from coopnets.inference.profiler import record_calls
from coopnets.models.exit_head import head_kind_for
from coopnets.models.plans import structure_keys
from coopnets.train.build import model_factory
from coopnets.train.recipe import create_recipe

NUM_CLASSES = 10
RESNET18_BLOCK_WIDTHS = [64, 64, 128, 128, 256, 256, 512]


def _blocks_resnet18() -> coopnets.DepthAdaptiveModel:
    return coopnets.wrap("resnet18", num_classes=NUM_CLASSES, exit_points="blocks")


@pytest.fixture(scope="module")
def model() -> coopnets.DepthAdaptiveModel:
    torch.manual_seed(0)
    m = _blocks_resnet18()
    with torch.no_grad():  # timm zero-initialises each block's last BN scale: make every block count
        for p in m.parameters():
            if not p.any():
                p.normal_(std=0.1)
    return m.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _blocks(m: coopnets.DepthAdaptiveModel) -> List[nn.Module]:
    b = m.backbone
    return [block for layer in (b.layer1, b.layer2, b.layer3, b.layer4) for block in layer]


def test_resnet18_gets_an_exit_head_after_every_block(model):
    assert model.num_depths == 8
    assert model.depth_plan.config.exit_points == "blocks" and model.depth_plan.config.exit_indices == list(range(7))
    assert [head.in_chs for head in model.exits] == RESNET18_BLOCK_WIDTHS
    assert model.depth_plan.exit_modules() == ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0",
                                               "layer3.1", "layer4.0"]
    assert model.model_args() == {"num_classes": NUM_CLASSES, "plan": "exits", "exit_indices": list(range(7)),
                                  "head": head_kind_for("ResNet"), "exit_points": "blocks"}
    assert "block ends" in model.depth_plan.describe(model.model_args())
    assert "exit_points" in structure_keys()


def test_stage_exit_points_stay_the_default():
    m = coopnets.wrap("resnet18", num_classes=NUM_CLASSES)
    assert m.depth_plan.config.exit_points == "stages" and m.num_depths == 4
    assert "exit_points" not in m.model_args()  # checkpoints saved before the option keep their model_args
    assert coopnets.wrap("resnet18", exit_points="blocks", exit_indices=[1, 3, 5]).num_depths == 4


def test_costs_strictly_grow_with_depth(model):
    rows = coopnets.profile(model, input_size=(3, 32, 32), repeats=1, warmup=0, print_table=False)
    flops, params = [r["flops"] for r in rows], [r["params"] for r in rows]
    assert len(rows) == 8
    assert all(a < b for a, b in zip(flops, flops[1:])), flops
    assert all(a < b for a, b in zip(params, params[1:])), params


def test_depth_k_is_the_stem_its_blocks_and_its_exit_head(model, images):
    b = model.backbone
    with torch.no_grad():
        h = b.maxpool(b.act1(b.bn1(b.conv1(images))))
        for k, block in enumerate(_blocks(model)[:-1]):
            h = block(h)
            torch.testing.assert_close(model.set_depth(k + 1)(images), model.exits[k](h))
        torch.testing.assert_close(model.set_depth(-1)(images), b(images))


def test_forward_exits_runs_once_and_equals_every_depth(model, images):
    with torch.no_grad():
        logits = model.forward_exits(images)
        with record_calls(model) as calls:
            out = model.forward_exits(images, with_features=True)
    assert {calls[f"backbone.{name}"] for name in ("conv1", "fc", *model.depth_plan.exit_modules(), "layer4.1")} == {1}
    with torch.no_grad():
        per_depth = [model.forward_depth(images, d) for d in range(1, 9)]
    for got, feats_got, want in zip(logits, out.logits, per_depth):
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(feats_got, want)
    # one NCHW map per depth, the one its head reads (the last: the final block's output)
    assert [m[0].shape[1] for m in out.feature_maps] == RESNET18_BLOCK_WIDTHS + [512]
    assert all(m[0].ndim == 4 for m in out.feature_maps)
    assert [e.shape[1] for e in out.embeddings] == model.depth_plan.embedding_dims()


def test_forward_features_and_head_compose_at_every_depth(model, images):
    with torch.no_grad():
        for depth in range(1, 9):
            with model.at_depth(depth):
                torch.testing.assert_close(model.forward_head(model.forward_features(images)), model(images))


def test_save_and_load_round_trip_at_every_depth(model, images, tmp_path):
    coopnets.save_pretrained(model, tmp_path / "ckpt")
    loaded = coopnets.create_model(f"local-dir:{tmp_path / 'ckpt'}", pretrained=True).eval()
    assert loaded.depth_plan.config.exit_points == "blocks"
    structure = structure_keys()
    assert {k: loaded.model_args().get(k) for k in structure} == {k: model.model_args().get(k) for k in structure}
    with torch.no_grad():
        for depth in range(1, 9):
            torch.testing.assert_close(loaded.forward_depth(images, depth), model.forward_depth(images, depth))


def test_export_equals_set_depth(model, images):
    full_params = sum(p.numel() for p in model.backbone.parameters())
    with torch.no_grad():
        for depth in range(1, 9):
            small = model.export(depth)
            torch.testing.assert_close(small(images), model.set_depth(depth)(images))
    assert sum(p.numel() for p in model.export(3).parameters()) < full_params
    model.set_depth(-1)


def test_early_exit_equals_its_simulation(model, images):
    with torch.no_grad():
        all_logits = model.forward_exits(images)
    # per-exit entropy thresholds at each exit's median: samples leave at several depths
    entropies = [-confidence_score(z, "entropy") for z in all_logits[:-1]]
    thresholds = [float(e.median()) + 1e-6 for e in entropies]
    ee = coopnets.EarlyExit(model, criterion="entropy", threshold=thresholds)
    assert ee.runner(images.shape[1:]) is model.depth_plan.runner and model.depth_plan.runner.kind == "layout"
    got, want = ee(images), ee.simulate(all_logits, image_size=images.shape[1:])
    assert got.exit_depths.tolist() == want.exit_depths.tolist()
    assert len(set(got.exit_depths.tolist())) > 1
    torch.testing.assert_close(got.logits, want.logits)
    assert all(a < b for a, b in zip(got.depth_flops, got.depth_flops[1:]))


def test_group_matcher_puts_each_exit_with_the_block_it_follows():
    m = _blocks_resnet18()
    groups = group_parameters(m, m.group_matcher(coarse=False))
    group_of = {name: g for g, names in groups.items() for name in names}
    for k, module in enumerate(m.depth_plan.exit_modules()):
        assert group_of[f"exits.{k}.fc.weight"] == group_of[f"backbone.{module}.conv1.weight"]


def test_reset_classifier_reaches_every_exit(images):
    m = _blocks_resnet18().eval()
    m.reset_classifier(0)
    with torch.no_grad():
        assert [z.shape[1] for z in m.forward_exits(images)] == [h.num_features for h in m.exits] + [512]


def test_backbone_without_layout_is_a_clear_error():
    with pytest.raises(ValueError, match=r"exit_points='blocks' needs a block-level layout.*ByobNet.*ResNet.*"
                                         r"Use exit_points='stages'"):
        coopnets.wrap("test_byobnet", num_classes=3, exit_points="blocks")


@pytest.mark.parametrize("kwargs, match", [
    ({"exit_points": "layers"}, "valid choices: stages, blocks"),
    ({"exit_points": "blocks", "plan": "blocks"}, "belongs to plan='exits'"),
    ({"exit_points": "blocks", "exit_indices": [7]}, "increasing block-end indices in 0..6"),
])
def test_invalid_options_are_clear(kwargs, match):
    with pytest.raises(ValueError, match=match):
        coopnets.wrap("resnet18", **kwargs)


def test_training_model_kwargs_reach_the_model():
    """``--model-kwargs exit_points=blocks`` ends up in NetFactory's kwargs."""
    with torch.device("meta"):
        assert model_factory("resnet18", NUM_CLASSES, model_kwargs={"exit_points": "blocks"})().num_depths == 8
        assert model_factory("coop_resnet18", NUM_CLASSES, model_kwargs={"exit_points": "blocks"})().num_depths == 8


@pytest.mark.parametrize("method", ["multi_exit", "mlcsd"])
def test_a_training_step_works(method, images):
    torch.manual_seed(0)
    recipe = create_recipe(method, _blocks_resnet18).train()
    opt = torch.optim.SGD(recipe.parameters(), lr=0.01)
    out = recipe(images, torch.arange(4))
    out.loss.backward()
    opt.step()
    assert torch.isfinite(out.loss) and len(out.logits) == 8
    assert all(p.grad is not None for p in recipe.net.exits.parameters())


@pytest.mark.parametrize("name, kwargs", [
    ("test_convnext", {}),  # downsampling between stages (StageLayout.enter)
    ("mobilenetv3_small_050", {}),  # stages without a feature_info entry: export empties them
    ("test_vit", {"img_size": 32}),  # token maps (StageLayout.to_nchw)
])
def test_other_layout_families(name, kwargs, images):
    torch.manual_seed(0)
    m = coopnets.wrap(name, num_classes=NUM_CLASSES, exit_points="blocks", **kwargs).eval()
    assert m.num_depths > 3
    with torch.no_grad():
        all_logits = m.forward_exits(images)
        for depth in range(1, m.num_depths + 1):
            want = m.forward_depth(images, depth)
            torch.testing.assert_close(all_logits[depth - 1], want)
            torch.testing.assert_close(m.export(depth)(images), want)
    ee = coopnets.EarlyExit(m, criterion="patience", threshold=1)
    got, sim = ee(images), ee.simulate(all_logits)
    assert got.exit_depths.tolist() == sim.exit_depths.tolist()
    torch.testing.assert_close(got.logits, sim.logits)


def test_one_layout_object_per_model(model):
    """The plan, its exit points, its runner and ``model.layout`` share the backbone's one layout."""
    plan = model.depth_plan
    assert plan.layout is plan.points.layout is plan.runner.layout is model.layout
