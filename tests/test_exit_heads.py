"""Exit heads (issue 27, "exits that pay"): every kind's shapes, classifier reset and training; each zoo
family's measured default (``head="auto"``) and its cost beside its depth (FLOPs and parameters: a
structural proxy of ``benchmarks/exit_heads.py``'s latency rule, no wall clock); checkpoints of the older
formats keep their ``conv`` heads and logits whatever the default."""
from __future__ import annotations

import functools
import json
import shutil
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import coopnets
from coopnets.hub import CheckpointError
from coopnets.hub.format import checkpoint_config
from coopnets.inference.profiler import format_table, record_calls, used_parameters
from coopnets.models.exit_head import (DEFAULT_HEADS, EXIT_HEAD_KINDS, OTHER_CNN_HEAD, REDUCE_WIDTH, ExitHead,
                                       MixedPool2d, head_kind_for, is_transformer)

DATA = Path(__file__).with_name("data")
#: the exits-plan checkpoints of formats 1 and 2 (tests/data, with their expected logits at every depth)
OLD_EXITS_CHECKPOINTS = ["checkpoint_v1_coop_resnet18", "checkpoint_v1_wrapped_test_resnet",
                         "checkpoint_v2_coop_resnet18", "checkpoint_v2_wrapped_test_resnet"]
#: the design rule's limit (benchmarks/exit_heads.py), here on FLOPs: a head's share of its depth's
LIMIT = 0.10
#: a head's parameters besides its classifier (whose size the classes set, for any head) beside its trunk's
PARAM_LIMIT = 0.5


def _map(chs: int = 16) -> torch.Tensor:
    return torch.randn(2, chs, 12, 12)


# --- every kind ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind, width, embedding", [
    ("linear", None, 16), ("conv", None, 48), ("conv", 24, 24), ("reduce", None, REDUCE_WIDTH), ("reduce", 24, 24),
    ("mixpool", None, 16), ("mlp", None, 16), ("mlp", 24, 24),
])
def test_every_kind_gives_logits_and_its_embedding(kind, width, embedding):
    head = ExitHead(16, 5, kind=kind, reduction=8, final_reduction=32, width=width, final_width=48).eval()
    x = _map()
    logits, emb = head.forward_both(x)
    assert head.kind == kind and head.num_features == embedding
    assert logits.shape == (2, 5) and emb.shape == (2, embedding)
    assert torch.allclose(head(x), logits) and torch.allclose(head.forward_head(head.forward_features(x)), logits)
    assert head.forward_features(x).shape[1] == (16 if kind in ("linear", "mixpool", "mlp") else embedding)


@pytest.mark.parametrize("kind", EXIT_HEAD_KINDS)
def test_reset_classifier_keeps_timms_semantics_for_every_kind(kind):
    head = ExitHead(16, 5, kind=kind, reduction=8, final_reduction=32).eval()
    x = _map()
    spatial = head.forward_features(x).shape[-2:]
    head.reset_classifier(7)
    assert head(x).shape == (2, 7) and head.fc.in_features == head.num_features
    head.reset_classifier(0)
    assert head(x).shape == (2, head.num_features)
    head.reset_classifier(3, "")  # unpooled: the neck and the classifier per position
    assert head(x).shape == (2, 3, *spatial)
    head.reset_classifier(0, "")
    assert head(x).shape == (2, head.num_features, *spatial)
    head.reset_classifier(3, "mix")
    assert isinstance(head.pool, MixedPool2d) and head(x).shape == (2, 3)
    head.reset_classifier(3, "avgmax")
    assert head(x).shape == (2, 3) and head.global_pool == "avgmax"


def test_mixpool_mixes_max_and_average_pooling_by_a_learned_weight():
    head = ExitHead(4, 2, kind="mixpool")
    assert head.global_pool == "mix" and isinstance(head.pool, MixedPool2d)
    x = torch.rand(1, 4, 5, 5)
    with torch.no_grad():
        head.pool.logit.fill_(50.0)  # all max
        assert torch.allclose(head.pool(x).flatten(), x.amax(dim=(-2, -1)).flatten())
        head.pool.logit.fill_(-50.0)  # all average
        assert torch.allclose(head.pool(x).flatten(), x.mean(dim=(-2, -1)).flatten())


def test_bad_kinds_and_pools_are_explained():
    with pytest.raises(ValueError, match="valid kinds: linear, conv, reduce, mixpool, mlp"):
        ExitHead(8, 2, kind="round")
    with pytest.raises(ValueError, match="valid: 'avg', 'mix', '', 'max', 'avgmax', 'fast'"):
        ExitHead(8, 2).reset_classifier(2, "sum")
    with pytest.raises(ValueError, match="valid kinds: auto, linear, conv, reduce, mixpool, mlp"):
        coopnets.wrap("test_resnet", num_classes=3, head="round")


@pytest.mark.parametrize("kind", EXIT_HEAD_KINDS)
def test_every_kind_trains(kind):
    """Every parameter of every exit head gets a gradient from the exits' losses, and a few steps lower them."""
    model = coopnets.wrap("test_resnet", num_classes=3, head=kind).train()
    assert {head.kind for head in model.exits} == {kind}
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 3
    opt = torch.optim.SGD(model.exits.parameters(), lr=0.1)

    def loss() -> torch.Tensor:
        return sum(F.cross_entropy(logits, y) for logits in model.forward_exits(x)[:-1])

    first = loss()
    first.backward()
    for name, p in model.exits.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for _ in range(5):
        opt.step()
        opt.zero_grad()
        loss().backward()
    assert loss().item() < first.item()


@pytest.mark.parametrize("kind", EXIT_HEAD_KINDS)
def test_an_explicit_kind_is_built_and_recorded(kind):
    model = coopnets.wrap("test_resnet", num_classes=3, head=kind, head_width=20)
    assert model.model_args()["head"] == kind and {h.kind for h in model.exits} == {kind}
    widths = [h.num_features for h in model.exits]
    assert widths == ([20] * 3 if kind in ("conv", "reduce", "mlp") else [h.in_chs for h in model.exits])


# --- the default per family -----------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def zoo(name: str) -> coopnets.DepthAdaptiveModel:
    """Zoo entry ``name`` as the zoo builds it (its default classes), eval (the last one asked for is kept)."""
    return coopnets.create_model(name).eval()


@pytest.mark.parametrize("name", coopnets.list_models())
def test_auto_head_is_the_measured_default_of_each_family(name):
    model = zoo(name)
    family = type(model.backbone).__name__
    expected = "linear" if is_transformer(family) else DEFAULT_HEADS[family.lower()]  # every CNN family measured
    assert model.depth_plan.config.head == head_kind_for(model.backbone) == head_kind_for(family) == expected
    assert {h.kind for h in model.exits} == {expected} and model.model_args()["head"] == expected


def test_auto_head_of_families_not_measured():
    assert set(DEFAULT_HEADS.values()) <= set(EXIT_HEAD_KINDS) and OTHER_CNN_HEAD in EXIT_HEAD_KINDS
    assert head_kind_for("SomeNewNet") == OTHER_CNN_HEAD
    assert coopnets.wrap("test_byobnet", num_classes=3).depth_plan.config.head == OTHER_CNN_HEAD
    assert coopnets.wrap("test_vit", num_classes=3, img_size=32).depth_plan.config.head == "linear"
    assert coopnets.wrap("test_resnet", num_classes=3).depth_plan.config.head == DEFAULT_HEADS["resnet"]


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@pytest.mark.parametrize("name", coopnets.list_models())
def test_default_head_is_small_beside_its_depth(name, one_torch_thread):
    """At 224 px, batch 1: each default exit head's FLOPs are at most 10 % of its depth's (trunk + head), and its
    parameters besides the classifier at most half of its trunk's."""
    model = zoo(name)
    runner, x = model.depth_plan.runner, torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        for k, head in enumerate(model.exits):
            fmap = runner.map_at(x, k)
            trunk, own = _flops(lambda: runner.map_at(x, k)), _flops(lambda: head(fmap))
            assert own / (trunk + own) <= LIMIT, (k + 1, own / (trunk + own))
            with record_calls(model.backbone) as calls:
                runner.map_at(x, k)
            trunk_params = used_parameters(model.backbone, set(calls))
            body = sum(p.numel() for p in head.parameters()) - sum(p.numel() for p in head.fc.parameters())
            assert body <= PARAM_LIMIT * trunk_params, (k + 1, body, trunk_params)


@pytest.mark.parametrize("backbone, plan", [("test_resnet", "exits"), ("resnet18", "blocks")])
def test_profile_reports_each_heads_cost_beside_its_depth(backbone, plan):
    """``coopnets.profile`` times each depth's head alone on the map it reads (an exit head, or the backbone's own
    head where a depth has none) and reports it beside the depth, with its share."""
    model = coopnets.wrap(backbone, num_classes=3, plan=plan)
    rows = coopnets.profile(model, input_size=(3, 32, 32), repeats=1, warmup=0, print_table=False)
    assert len(rows) == model.num_depths
    for r in rows:
        assert r["head_ms"] > 0 and r["head_share"] == r["head_ms"] / r["latency_ms"]
    assert "| head (ms) | head share |" in format_table(rows)


# --- checkpoints of older formats -----------------------------------------------------------
@pytest.mark.parametrize("name", OLD_EXITS_CHECKPOINTS)
def test_old_checkpoints_keep_their_conv_heads_and_logits(name):
    """Formats 1 and 2 recorded the resolved head (``conv``) in ``model_args``: they load with ``conv`` heads,
    whatever ``auto`` means now, and give the logits stored when they were written."""
    folder = DATA / name
    config = json.loads((folder / "config.json").read_text())
    assert config["model_args"]["head"] == "conv"
    expected = torch.load(DATA / f"{name}.expected.pt", weights_only=True)
    for create in (coopnets.create_model, timm.create_model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # format 1 does not record its data config
            loaded = create(f"local-dir:{folder}", pretrained=True).eval()
        assert {h.kind for h in loaded.exits} == {"conv"} and loaded.model_args()["head"] == "conv"
        with torch.no_grad():
            for d, want in enumerate(expected["logits"], 1):
                assert torch.allclose(loaded.forward_depth(expected["x"], d), want, atol=1e-5)


@pytest.mark.parametrize("recorded", [None, "auto"])
def test_a_checkpoint_without_its_head_fails_loudly(tmp_path, recorded):
    """A config whose head was removed (or set to ``auto``) by hand would build today's default: loading
    refuses it, naming the head, instead of loading other heads than those saved."""
    folder = tmp_path / "ckpt"
    shutil.copytree(DATA / "checkpoint_v2_coop_resnet18", folder)
    config = json.loads((folder / "config.json").read_text())
    if recorded is None:
        del config["model_args"]["head"]
    else:
        config["model_args"]["head"] = recorded
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="head: checkpoint"):
        coopnets.create_model(f"local-dir:{folder}", pretrained=True)


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "mobilenetv3_small_100"])
def test_checkpoints_record_the_resolved_head(name):
    """What ``auto`` resolves to is written into every checkpoint, so a later default never changes how it loads."""
    kwargs = {"img_size": 32} if name == "test_vit" else {}
    model = coopnets.wrap(name, num_classes=3, **kwargs)
    assert checkpoint_config(model)["model_args"]["head"] == head_kind_for(model.backbone) != "auto"
