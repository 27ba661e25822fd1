"""Training methods as recipes (issue 4): ekd, mlcsd, byot, multi_exit, independent."""
from __future__ import annotations

import hashlib
from typing import Callable, Dict, List, Tuple

import pytest
import torch
from torch import nn

import coopnets
from coopnets.train.recipe import RECIPES, Recipe, SingleNetRecipe, create_recipe

NUM_CLASSES = 3


def _resnet(**kwargs) -> Callable[[], coopnets.DepthAdaptiveModel]:
    """test_resnet with ``conv`` exit heads unless ``head`` says otherwise (REFERENCE was recorded with them)."""
    return lambda: coopnets.wrap("test_resnet", num_classes=NUM_CLASSES, **{"head": "conv", **kwargs})


def _resnet18_blocks() -> coopnets.DepthAdaptiveModel:
    return coopnets.wrap("resnet18", plan="blocks", num_classes=NUM_CLASSES)


def _vit() -> coopnets.DepthAdaptiveModel:
    return coopnets.wrap("test_vit", num_classes=NUM_CLASSES, img_size=32)


# id -> (method, model factory, config): every method, on each setting it documents
CASES: Dict[str, Tuple[str, Callable[[], coopnets.DepthAdaptiveModel], dict]] = {
    "multi_exit": ("multi_exit", _resnet(), {}),
    "ekd-blocks": ("ekd", _resnet18_blocks, {}),
    "ekd-exits": ("ekd", _resnet(), {}),
    "ekd-exits-vit": ("ekd", _vit, {}),
    "mlcsd": ("mlcsd", _resnet(), {}),
    "mlcsd-linear-heads": ("mlcsd", _resnet(head="linear"), {}),
    "byot": ("byot", _resnet(), {}),
    "byot-linear-heads": ("byot", _resnet(head="linear"), {}),
    "independent-2": ("independent", _resnet(), {"depth": 2}),
    "independent-full": ("independent", _resnet(), {"depth": -1}),
}


def _batch(n: int = 8) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % NUM_CLASSES


def _build(case: str) -> Recipe:
    method, model_fn, config = CASES[case]
    torch.manual_seed(0)
    return create_recipe(method, model_fn, config)


def _trained_parts(recipe: Recipe) -> List[Tuple[str, nn.Parameter]]:
    """The parameters a recipe claims to train in every step.

    All of them, except for ``independent``, which trains the stem, the stages its depth
    runs and that depth's head (checked through the parameters its truncated forward uses).
    """
    params = list(recipe.named_parameters())
    if recipe.name != "independent":
        return params
    net = recipe.net
    x, _ = _batch(2)
    used = set()
    hooks = [m.register_forward_hook(lambda mod, i, o: used.add(mod)) for m in net.modules() if not list(m.children())]
    with torch.no_grad():
        net.forward_depth(x, recipe.trained_depth)
    for h in hooks:
        h.remove()
    names = {id(p) for m in used for p in m.parameters(recurse=False)}
    return [(n, p) for n, p in params if id(p) in names]


def _unzero(recipe: Recipe) -> Recipe:
    """Re-draw the net's all-zero parameters.

    timm zero-initialises each residual block's last BN scale, so at step 0 a block is
    the identity and its convs get no gradient (and on the ``blocks`` plan every sub-net
    equals the full net); un-zeroing tests the loss graph rather than the init.
    """
    with torch.no_grad():
        for p in recipe.net.parameters():
            if not p.any():
                p.normal_(std=0.1)
    return recipe


@pytest.mark.parametrize("case", CASES)
def test_loss_decreases_on_a_fixed_batch(case):
    torch.set_num_threads(1)
    recipe = _build(case).train()
    x, y = _batch()
    opt = torch.optim.SGD(recipe.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(6):
        out = recipe(x, y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        assert torch.isfinite(out.loss)
    assert losses[-1] < 0.8 * losses[0], losses
    assert len(out.logits) == recipe.eval_models()["net"].num_depths
    assert out.terms and all(isinstance(v, float) for v in out.terms.values())


@pytest.mark.parametrize("case", CASES)
def test_every_trained_part_gets_gradient(case):
    torch.set_num_threads(1)
    recipe = _unzero(_build(case).train())
    x, y = _batch()
    recipe(x, y).loss.backward()
    trained = _trained_parts(recipe)
    assert trained
    dead = [n for n, p in trained if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"{case}: no gradient for {dead}"
    if recipe.name == "independent":
        # the rest of the net is untouched: deeper stages and other heads get no gradient
        trained_ids = {id(p) for _, p in trained}
        assert not recipe.trains_all_parameters
        assert all(p.grad is None for p in recipe.parameters() if id(p) not in trained_ids)
        assert len(trained) < len(list(recipe.parameters()))


# id -> (state-dict size, sha256[:16] of its keys joined by newlines, init checksum
# (sum_i i * sum(tensor_i) over the float tensors, 1-based, in state-dict order), the
# losses of the first two SGD steps on _batch(4)), all measured with the code before
# SingleNetRecipe existed (commit f17d638): the base class changed no parameter, its
# creation order or RNG draw, no state-dict key and no loss.
REFERENCE: Dict[str, Tuple[int, str, float, Tuple[float, float]]] = {
    "multi_exit": (140, "2bec316c28582d7d", 212722.22543120346, (5.0796709060668945, 3.1489601135253906)),
    "ekd-blocks": (122, "c0a10cbbac4f4e73", 637384.1617912876, (2.1179897785186768, 0.7734856605529785)),
    "ekd-exits": (140, "2bec316c28582d7d", 212722.22543120346, (5.4391679763793945, 3.389505624771118)),
    "ekd-exits-vit": (92, "5af1f6870ba6eed5", 50674.99476042287, (5.764647960662842, 3.244339942932129)),
    "mlcsd": (148, "57c7660c01ceeac2", 212722.22543120346, (20.42647933959961, 17.515602111816406)),
    "mlcsd-linear-heads": (118, "ed59e0a919a719d7", 130299.66396259036, (24.15038299560547, 19.122154235839844)),
    "byot": (140, "2bec316c28582d7d", 212722.22543120346, (4.274618148803711, 2.7925357818603516)),
    "byot-linear-heads": (110, "425ad8f7c0bba1eb", 130299.66396259036, (4.709407806396484, 2.9666483402252197)),
    "independent-2": (140, "2bec316c28582d7d", 212722.22543120346, (1.1783206462860107, 0.7907438278198242)),
    "independent-full": (140, "2bec316c28582d7d", 212722.22543120346, (1.3980334997177124, 0.7876112461090088)),
    "cooperative": (372, "f54cd10f5c0900f6", 1373988.5373274782, (10.70556354522705, 6.974515438079834)),
}


@pytest.mark.parametrize("case", REFERENCE)
def test_recipe_matches_the_code_before_single_net_recipe(case):
    torch.set_num_threads(1)
    method, model_fn, config = dict(CASES, cooperative=("cooperative", _resnet(), {}))[case]
    torch.manual_seed(0)
    recipe = create_recipe(method, model_fn, config).train()
    n_keys, keys_sha, init, losses = REFERENCE[case]
    state = recipe.state_dict()
    assert len(state) == n_keys and hashlib.sha256("\n".join(state).encode()).hexdigest()[:16] == keys_sha
    got = sum(float(v.double().sum()) * i for i, v in enumerate(state.values(), 1) if v.is_floating_point())
    assert got == pytest.approx(init, rel=1e-12)  # same init: same creation order and RNG draws
    x, y = _batch(4)
    opt = torch.optim.SGD(recipe.parameters(), lr=0.01, momentum=0.9)
    for expected in losses:
        out = recipe(x, y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    if method != "cooperative":
        assert isinstance(recipe, SingleNetRecipe)
        assert recipe.eval_models() == {"net": recipe.net} and recipe.deployable({"net": [0.1]}) == "net"


def test_adapters_exist_only_where_widths_differ():
    assert len(list(_build("byot").adapters.parameters())) == 0  # conv heads: equal widths
    linear = _build("mlcsd-linear-heads")
    kinds = [type(m).__name__ for m in linear.adapters.maps]
    assert kinds == ["Linear", "Linear", "Linear", "Identity"]  # widths 32, 48, 192 -> 96


def test_ekd_attention_term_is_active_on_blocks_plan():
    out = _unzero(_build("ekd-blocks"))(*_batch(4))
    assert set(out.terms) == {"ce_1", "ce_2", "kd_1", "at_1"}
    assert out.terms["at_1"] > 0 and out.terms["kd_1"] > 0


def test_ekd_attention_on_exits_plan_compares_with_the_last_map():
    vit = _build("ekd-exits-vit")(*_batch(4))  # every map 2x2: an informative attention term
    assert all(vit.terms[f"at_{d}"] > 0 for d in (1, 2, 3))
    resnet = _build("ekd-exits")(*_batch(4))  # last ResNet map is 1x1 at 32px: documented zero
    assert all(resnet.terms[f"at_{d}"] == 0 for d in (1, 2, 3))


def test_mlcsd_weighting_is_trained():
    torch.set_num_threads(1)
    recipe = _build("mlcsd").train()
    x, y = _batch()
    before = recipe.teacher_weights(x)
    assert torch.allclose(before, torch.full_like(before, 1 / 4))  # zero init: uniform teachers
    opt = torch.optim.SGD(recipe.parameters(), lr=0.05, momentum=0.9)
    for _ in range(5):
        loss = recipe(x, y).loss
        opt.zero_grad()
        loss.backward()
        for p in recipe.weighting.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
        opt.step()
    after = recipe.teacher_weights(x)
    assert (after - before).abs().max() > 1e-3
    assert torch.allclose(after.sum(-1), torch.ones(after.shape[:2]))


def test_mlcsd_distillation_targets_alone_give_the_weighting_no_gradient():
    """Why the ensemble CE exists: with it switched off the weighting module is dead."""
    method, model_fn, _ = CASES["mlcsd"]
    recipe = create_recipe(method, model_fn, {"ensemble_weight": 0.0})
    recipe(*_batch(4)).loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in recipe.weighting.parameters())


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        create_recipe("byott", _resnet())
    for name in ("byot", "ekd", "independent", "mlcsd", "multi_exit"):
        assert name in RECIPES and name in str(err.value)


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ValueError, match="temperature"):
        create_recipe("ekd", _resnet(), {"temprature": 2.0})


def test_independent_trains_the_depth_it_is_given():
    assert _build("independent-full").trained_depth == 4
    assert _build("independent-2").trained_depth == 2
    with pytest.raises(ValueError, match="depth"):
        create_recipe("independent", _resnet(), {"depth": 5})
