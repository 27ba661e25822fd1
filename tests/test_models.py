"""Core: the depth-adaptive wrapper over timm families (issue 2)."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

import coopnets
from coopnets.models.depth_adaptive import DepthAdaptiveModel
from coopnets.models.exit_head import head_kind_for
from coopnets.models.plans.blocks import default_block_depths
from coopnets.inference.profiler import record_calls

# (timm name, backbone kwargs, input size): tiny configs that run in milliseconds on CPU
FAMILIES = {
    "resnet": ("test_resnet", {}, 32),
    "convnext": ("test_convnext", {}, 32),
    "efficientnet": ("test_efficientnet", {}, 32),
    "mobilenetv3": ("mobilenetv3_small_050", {}, 32),
    "regnet": ("regnety_002", {}, 32),
    "vit": ("test_vit", {"img_size": 32}, 32),
    "swin": ("swin_tiny_patch4_window7_224",
             {"img_size": 32, "window_size": 2, "embed_dim": 16, "depths": (1, 1, 2, 1), "num_heads": (1, 1, 1, 1)}, 32),
}
NUM_CLASSES = 5


def _pair(family):
    """A wrapped model and the plain timm model holding the same backbone weights."""
    name, kwargs, size = FAMILIES[family]
    plain = timm.create_model(name, num_classes=NUM_CLASSES, **kwargs).eval()
    model = coopnets.wrap(name, num_classes=NUM_CLASSES, **kwargs).eval()
    model.backbone.load_state_dict(plain.state_dict())
    return model, plain, torch.randn(2, 3, size, size)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_depth_gives_logits_and_full_depth_is_plain_timm(family):
    model, plain, x = _pair(family)
    assert model.num_depths == 4
    with torch.no_grad():
        for depth in range(1, model.num_depths + 1):
            assert model.set_depth(depth)(x).shape == (2, NUM_CLASSES)
        torch.testing.assert_close(model.set_depth(-1)(x), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_exits_matches_each_depth(family):
    model, _, x = _pair(family)
    with torch.no_grad():
        exits = model.forward_exits(x)
        assert len(exits) == model.num_depths
        for depth, logits in enumerate(exits, start=1):
            torch.testing.assert_close(logits, model.forward_depth(x, depth), rtol=1e-5, atol=1e-5)
        feats = model.forward_exits(x, with_features=True)
    assert len(feats.embeddings) == len(feats.feature_maps) == model.num_depths
    assert all(m[0].ndim == 4 for m in feats.feature_maps)


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_runner_reproduces_forward_intermediates(family):
    """The block-level runner (blocks plan, early exit) sees the same features as timm."""
    model, plain, x = _pair(family)
    layout, hw = model.layout, tuple(x.shape[-2:])
    with torch.no_grad():
        stem = layout.stem(x)
        for idx in model.depth_plan.config.exit_indices:
            ours = layout.to_nchw(layout.run(stem, (0, 0), layout.feature_ends[idx]), hw)
            timms = plain.forward_intermediates(x, indices=[idx], stop_early=True, intermediates_only=True)[0]
            torch.testing.assert_close(ours, timms, rtol=1e-5, atol=1e-5)
        full = plain.forward_head(layout.finish(layout.run(stem, (0, 0), layout.end)))
        torch.testing.assert_close(full, plain(x), rtol=1e-5, atol=1e-5)


def _called_backbone_modules(model, x, depth):
    with torch.no_grad(), record_calls(model) as calls:
        model.set_depth(depth)(x)
    return {n for n in calls if n.startswith("backbone.")}, {n for n in calls if n.startswith("exits.")}


@pytest.mark.parametrize("family", FAMILIES)
def test_shallow_depths_execute_strictly_less(family):
    model, _, x = _pair(family)
    previous: set = set()
    for depth in range(1, model.num_depths + 1):
        backbone_calls, exit_calls = _called_backbone_modules(model, x, depth)
        assert previous < backbone_calls, f"depth {depth} must run more backbone modules than depth {depth - 1}"
        previous = backbone_calls
        used_heads = {n.split(".")[1] for n in exit_calls}
        assert used_heads == ({str(depth - 1)} if depth < model.num_depths else set())
    # nothing of the stage after exit 1 runs at depth 1
    later = "backbone." + model.feature_info[model.depth_plan.config.exit_indices[0] + 1]["module"]
    calls_1, _ = _called_backbone_modules(model, x, 1)
    assert not any(n == later or n.startswith(later + ".") for n in calls_1)


@pytest.mark.parametrize("family", ["resnet", "convnext", "vit", "swin"])
def test_blocks_plan_skips_blocks_and_full_depth_is_plain(family):
    name, kwargs, size = FAMILIES[family]
    kwargs = dict(kwargs)
    if family == "resnet":
        name = "resnet18"  # test_resnet has one block per stage: nothing to skip
    plain = timm.create_model(name, num_classes=NUM_CLASSES, **kwargs).eval()
    with torch.no_grad():  # timm zero-inits residual branches: make skipped blocks matter
        for p in plain.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model = coopnets.wrap(plain, plan="blocks").eval()
    x = torch.randn(2, 3, size, size)
    full = [len(s) for s in model.layout.stages]
    assert model.depth_plan.config.block_depths[-1] == full and model.num_depths >= 2
    with torch.no_grad():
        ref = plain(x)
        torch.testing.assert_close(model.set_depth(-1)(x), ref, rtol=0, atol=0)
        shallow = model.set_depth(1)(x)
    assert shallow.shape == ref.shape and not torch.allclose(shallow, ref)
    calls_1, _ = _called_backbone_modules(model, x, 1)
    calls_full, _ = _called_backbone_modules(model, x, model.num_depths)
    assert calls_1 < calls_full


def test_default_block_depths_follow_ekd():
    assert default_block_depths([3, 4, 6, 3]) == [[1, 1, 1, 1], [2, 2, 2, 2], [3, 4, 6, 3]]
    assert default_block_depths([2, 2, 2, 2]) == [[1, 1, 1, 1], [2, 2, 2, 2]]
    model = coopnets.create_model("coop_resnet50", plan="blocks", num_classes=3)
    assert model.depth_plan.config.block_depths == [[1, 1, 1, 1], [2, 2, 2, 2], [3, 4, 6, 3]]


def test_vit_exits_are_evenly_spaced():
    model = coopnets.wrap("vit_small_patch16_224", num_classes=3, depth=12)
    assert model.depth_plan.config.exit_indices == [2, 5, 8] and model.depth_plan.config.head == "linear"
    assert coopnets.wrap("test_vit", num_classes=3, num_exits=2).depth_plan.config.exit_indices == [2]


@pytest.mark.parametrize("name", coopnets.list_models())
def test_zoo_entries_build_with_stage_exits(name):
    model = coopnets.create_model(name, num_classes=3)
    assert isinstance(model, DepthAdaptiveModel)
    assert model.num_depths == 4 and len(model.exits) == 3
    assert model.depth_plan.config.head == head_kind_for(model.backbone)  # per family: tests/test_exit_heads.py
    assert model.pretrained_cfg["architecture"] == name


def test_zoo_lists_the_required_models():
    required = {
        "coop_resnet18", "coop_resnet34", "coop_resnet50", "coop_resnet101", "coop_mobilenetv3_large_100",
        "coop_efficientnet_b0", "coop_convnext_tiny", "coop_regnety_016", "coop_vit_small_patch16_224",
        "coop_swin_tiny_patch4_window7_224",
    }
    assert required <= set(coopnets.list_models("coop_*"))
    assert coopnets.list_models("coop_resnet*") == ["coop_resnet18", "coop_resnet34", "coop_resnet50", "coop_resnet101"]
    assert not any(n.startswith("resnet") for n in coopnets.list_models())


def test_timm_registry_interop():
    assert {"coop_resnet50", "coop_vit_small_patch16_224"} <= set(timm.list_models("coop_*"))
    model = timm.create_model("coop_resnet18", num_classes=7)
    assert isinstance(model, DepthAdaptiveModel) and model.num_classes == 7
    assert timm.models.get_pretrained_cfg("coop_resnet18") is not None
    assert "coop_resnet" in timm.list_modules()


def test_state_dict_loads_across_depths():
    src = coopnets.create_model("coop_resnet18", num_classes=4).set_depth(2).eval()
    dst = coopnets.create_model("coop_resnet18", num_classes=4).eval()
    assert dst.depth == 4
    dst.load_state_dict(src.state_dict())  # strict: depth is not a weight
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for depth in range(1, 5):
            torch.testing.assert_close(src.forward_depth(x, depth), dst.forward_depth(x, depth))
    assert src.depth == 2 and dst.depth == 4


def test_at_depth_restores_previous_depth():
    model = coopnets.wrap("test_resnet", num_classes=3).set_depth(3)
    with model.at_depth(1):
        assert model.depth == 1
    assert model.depth == 3
    with pytest.raises(RuntimeError), model.at_depth(2):
        raise RuntimeError("boom")
    assert model.depth == 3


@pytest.mark.parametrize("bad", [0, 5, -2, 2.0, "2", True, None])
def test_set_depth_rejects_invalid_values(bad):
    model = coopnets.wrap("test_resnet", num_classes=3)
    with pytest.raises(ValueError, match=r"1\.\.4"):
        model.set_depth(bad)
    assert model.depth == 4


def test_unknown_zoo_name_suggests_close_names():
    with pytest.raises(ValueError, match="coop_resnet50") as err:
        coopnets.create_model("coop_resnet5")
    assert "Did you mean" in str(err.value)
    with pytest.raises(ValueError, match="coopnets.wrap"):
        coopnets.create_model("resnet50")


def test_unknown_timm_backbone_suggests_close_names():
    with pytest.raises(ValueError, match="resnet50"):
        coopnets.wrap("resnet5O")


def test_unknown_pretrained_tag_is_an_error():
    with pytest.raises(ValueError, match="no pretrained tag"):
        coopnets.create_model("coop_resnet18.nosuchtag")


def test_backbone_without_stages_is_rejected():
    class Flat(nn.Module):
        num_classes = 3
        pretrained_cfg: dict = {}

        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="cannot give stages"):
        coopnets.wrap(Flat())


def test_blocks_plan_on_family_without_layout_is_clear():
    with pytest.raises(ValueError, match="Supported backbone classes: ResNet"):
        coopnets.wrap("test_byobnet", plan="blocks", num_classes=3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"plan": "layers"}, "valid plans: exits, blocks"),
        ({"head": "round"}, "valid kinds: auto, linear, conv"),
        ({"exit_indices": [2, 1]}, "increasing feature_info indices"),
        ({"exit_indices": [1, 4]}, "final head"),
        ({"plan": "blocks", "block_depths": [[1, 1, 1, 1]]}, "last entry must be the full backbone"),
    ],
)
def test_bad_configuration_is_explained(kwargs, match):
    with pytest.raises(ValueError, match=match):
        coopnets.wrap("resnet18", num_classes=3, **kwargs)


def test_wrong_input_channels_are_explained():
    model = coopnets.wrap("test_resnet", num_classes=3)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\), got \(1, 1, 32, 32\)"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="expects images"):
        model.forward_exits(torch.randn(3, 32, 32))


def test_profile_counts_what_each_depth_runs():
    model = coopnets.create_model("coop_resnet18", num_classes=10)
    rows = coopnets.profile(model, input_size=(3, 32, 32), repeats=2, warmup=1, print_table=False)
    assert [r["depth"] for r in rows] == [1, 2, 3, 4]
    flops = [r["flops"] for r in rows]
    params = [r["params"] for r in rows]
    assert flops == sorted(flops) and len(set(flops)) == 4
    assert params[-1] == sum(p.numel() for p in model.backbone.parameters())
    assert params[0] < params[-1]
    # the exit head's own cost is included at depth 1
    head = model.exits[0]
    head_params = sum(p.numel() for p in head.parameters())
    stem_and_stage1 = sum(
        p.numel() for n, p in model.backbone.named_parameters() if n.split(".")[0] in {"conv1", "bn1", "layer1"}
    )
    assert params[0] == head_params + stem_and_stage1
    assert rows[-1]["flops_ratio"] == 1.0 and all(r["latency_ms"] > 0 for r in rows)
    assert model.depth == 4 and model.training


def test_profile_table_formats_rows():
    from coopnets.inference.profiler import format_table

    rows = [{"depth": 1, "accuracy": 0.5, "params": 1e6, "flops": 2e9, "latency_ms": 3.0, "flops_ratio": 1.0, "latency_ratio": 1.0}]
    table = format_table(rows, extra=("accuracy",))
    assert table.splitlines()[0].startswith("| depth | accuracy | params (M)")
    assert "| 1 | 0.5000 | 1.000 | 2.0000 | 3.00 | 1.000 | 1.000 |" in table


@pytest.mark.parametrize(
    "name, kwargs",
    [("test_byobnet", {}), ("test_nfnet", {}), ("test_maxvit", {"img_size": 64}), ("test_coatnet", {"img_size": 64}),
     ("test_mambaout", {}), ("test_vit_relpos", {"img_size": 64})],
)
def test_any_timm_family_wraps_through_forward_intermediates(name, kwargs):
    """Families without a block layout still get the exits plan, with real savings."""
    plain = timm.create_model(name, num_classes=NUM_CLASSES, **kwargs).eval()
    model = coopnets.wrap(name, num_classes=NUM_CLASSES, **kwargs).eval()
    model.backbone.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        exits = model.forward_exits(x)
        for depth in range(1, model.num_depths + 1):
            torch.testing.assert_close(model.forward_depth(x, depth), exits[depth - 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(exits[-1], plain(x), rtol=1e-5, atol=1e-5)
    calls_1, _ = _called_backbone_modules(model, x, 1)
    calls_full, _ = _called_backbone_modules(model, x, model.num_depths)
    assert len(calls_1) < len(calls_full)


# --- issue 11: timm's model contract at the current depth, training hooks, any backbone ----------------------
@pytest.mark.parametrize("family", ["resnet", "vit", "swin"])
def test_forward_features_and_head_compose_at_every_depth(family):
    model, plain, x = _pair(family)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), plain.forward_features(x))
        assert model.head_hidden_size == plain.head_hidden_size and model.num_features == plain.num_features
        for depth in range(1, model.num_depths + 1):
            with model.at_depth(depth):
                feats = model.forward_features(x)
                logits = model.forward_head(feats)
                emb = model.forward_head(feats, pre_logits=True)
                torch.testing.assert_close(logits, model(x), rtol=0, atol=0)
            assert logits.shape == (2, NUM_CLASSES) and emb.ndim == 2
            if depth < model.num_depths:
                assert feats.ndim == 4 and emb.shape[1] == model.exits[depth - 1].num_features


@pytest.mark.parametrize("family", ["resnet", "vit"])
def test_reset_classifier_reaches_every_exit_with_timm_semantics(family):
    model, _, x = _pair(family)
    model.reset_classifier(0)
    assert model.num_classes == 0
    with torch.no_grad():
        pooled = [model.forward_depth(x, d) for d in range(1, model.num_depths + 1)]
        assert pooled[-1].shape == (2, model.head_hidden_size)
        assert [p.shape[1] for p in pooled[:-1]] == [h.num_features for h in model.exits]
        model.reset_classifier(0, "")
        unpooled = [model.forward_depth(x, d) for d in range(1, model.num_depths + 1)]
    assert all(u.ndim in (3, 4) for u in unpooled) and all(u.ndim == 4 for u in unpooled[:-1])
    model.reset_classifier(7, "avg")
    with torch.no_grad():
        assert all(model.forward_depth(x, d).shape == (2, 7) for d in range(1, model.num_depths + 1))


def test_train_mode_forward_is_the_final_logits_and_every_parameter_gets_a_gradient():
    model, plain, x = _pair("resnet")
    model.train(), plain.train()
    out = model(x)
    torch.testing.assert_close(out, plain(x), rtol=0, atol=0)  # the exactly-zero term changes nothing
    out.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        if name.startswith("exits."):
            assert not p.grad.any(), f"{name}: the exits join the graph with weight 0"
    # opt out: plain timm behaviour, exits out of the graph
    model.zero_grad(set_to_none=True)
    model.exits_in_train_graph = False
    model(x).mean().backward()
    assert all(p.grad is None for p in model.exits.parameters())
    # below full depth, training-mode forward is that depth's sub-network
    model.zero_grad(set_to_none=True)
    model.set_depth(1)(x).mean().backward()
    assert all(p.grad is not None for p in model.exits[0].parameters())
    assert all(p.grad is None for p in model.exits[1].parameters())


def test_train_mode_zero_term_is_nan_safe():
    model = coopnets.wrap("test_resnet", num_classes=3).train()
    with torch.no_grad():
        model.exits[0].fc.bias.fill_(float("inf"))
    x = torch.randn(2, 3, 32, 32)
    assert torch.isfinite(model(x)).all()


def test_torchscript_and_fx_see_through_input_checks():
    model = coopnets.wrap("test_resnet", num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), eager)
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), eager)
        scripted_shallow = torch.jit.script(model.set_depth(1))
    with pytest.raises(Exception, match="full depth only"):
        scripted_shallow(x)


def test_features_only_goes_through_timms_feature_getter():
    feats = timm.create_model("coop_resnet18", features_only=True).eval()
    ref = timm.create_model("resnet18", features_only=True)
    assert feats.feature_info.channels() == ref.feature_info.channels()
    assert feats.feature_info.reduction() == ref.feature_info.reduction()
    with torch.no_grad():
        outs = feats(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == ref.feature_info.channels()
    picked = timm.create_model("coop_resnet18", features_only=True, out_indices=(2, 4))
    assert picked.feature_info.channels() == [128, 512]


def test_training_hooks_pass_through():
    model = coopnets.wrap("test_vit", img_size=32, num_classes=3)
    assert model.no_weight_decay() == {"backbone." + n for n in model.backbone.no_weight_decay()}
    matcher = model.group_matcher()
    assert any("exits" in str(spec) for spec in matcher.values())
    model.set_grad_checkpointing(True)
    assert model.backbone.grad_checkpointing


def test_input_channels_come_from_the_config_not_the_first_conv():
    model = coopnets.wrap("tresnet_m", num_classes=3).eval()  # space-to-depth stem: first conv reads 48 channels
    assert model.in_chans == 3
    with torch.no_grad():
        assert model.set_depth(1)(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    assert coopnets.wrap("test_resnet", in_chans=1).in_chans == 1


def test_parallel_branch_feature_info_gets_a_nested_selection():
    from torch.utils.flop_counter import FlopCounterMode

    model = coopnets.wrap("crossvit_tiny_240", num_classes=3).eval()  # feature_info lists both branches
    assert model.depth_plan.config.exit_indices == [0, 1]
    x = torch.randn(1, 3, 240, 240)
    flops = []
    with torch.no_grad():
        for depth in range(1, model.num_depths + 1):
            with FlopCounterMode(display=False) as counter:
                model.forward_depth(x, depth)
            flops.append(counter.get_total_flops())
    assert flops == sorted(set(flops)), f"FLOPs must strictly grow with depth, got {flops}"
    with pytest.raises(ValueError, match=r"module 'blocks.1', which also produces entry 1.*Valid exit_indices: \[0, 1\]"):
        coopnets.wrap("crossvit_tiny_240", exit_indices=[4])


def test_blocks_plan_needs_two_depths():
    with pytest.raises(ValueError, match="at least 2 depths.*one block"):
        coopnets.wrap("test_resnet", plan="blocks")
    with pytest.raises(ValueError, match="nested depths"):
        coopnets.wrap("resnet18", plan="blocks", block_depths=[[2, 2, 2, 2], [1, 1, 1, 1], [2, 2, 2, 2]])


def test_pretrained_means_timms_backbone_weights(tmp_path):
    src = timm.create_model("resnet18")
    path = tmp_path / "resnet18.pth"
    torch.save(src.state_dict(), path)
    model = coopnets.wrap("resnet18", num_classes=10, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    loaded = model.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in src.state_dict().items() if not k.startswith("fc."))
    assert model.num_classes == 10 and "pretrained_cfg_overlay" not in model.model_args()


@pytest.mark.parametrize("depth", [np.int64(2), np.int32(2), torch.tensor(2), torch.tensor(2, dtype=torch.int32)])
def test_integer_like_depths_are_accepted(depth):
    model = coopnets.wrap("test_resnet", num_classes=3)
    assert model.set_depth(depth).depth == 2 and type(model.depth) is int
    assert model.resolve_depth(depth) == 2


@pytest.mark.parametrize("bad", [torch.tensor(2.0), torch.tensor([2]), np.bool_(True), torch.tensor(True), np.float64(2)])
def test_non_integer_depths_are_rejected(bad):
    with pytest.raises(ValueError, match=r"1\.\.4"):
        coopnets.wrap("test_resnet", num_classes=3).set_depth(bad)


def test_at_depth_is_per_thread():
    """Four threads in their own ``at_depth`` blocks never see each other's depth, and the model's depth is
    untouched afterwards (before, the model was left at a wrong depth and some forwards ran another depth)."""
    import threading

    model = coopnets.wrap("test_resnet", num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = {d: model.forward_depth(x, d) for d in range(1, model.num_depths + 1)}
    errors = []
    start = threading.Barrier(model.num_depths)

    def worker(depth):
        start.wait()
        with torch.no_grad():
            for _ in range(30):
                with model.at_depth(depth):
                    got, seen = model(x), model.depth
                if seen != depth or not torch.equal(got, want[depth]):
                    errors.append((depth, seen))

    threads = [threading.Thread(target=worker, args=(d,)) for d in range(1, model.num_depths + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and model.depth == model.num_depths
    with model.at_depth(1), model.at_depth(2):  # blocks nest
        assert model.depth == 2
    assert model.depth == model.num_depths
