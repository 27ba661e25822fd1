"""Issue 20 item 4: timm ``train.py``'s flags, each checked to reach timm's own implementation.

Every test asserts the effect where timm puts it (the DropPath modules' ``drop_prob``, the train
transform's RandAugment, the optimizer's ``param_groups``, ...), not only that the flag is accepted.
"""
from __future__ import annotations

import argparse
import glob
import json
import struct
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from timm.data.auto_augment import RandAugment
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_interp_mode
from timm.layers import DropBlock2d, DropPath, SelectAdaptivePool2d
from torchvision import transforms as T

from coopnets.cli import main as coopnets_main
from coopnets.cli.train import add_arguments, config_from_args, warn_if_misleading
from coopnets.train import TrainConfig, Trainer
from coopnets.train.build import model_factory
from coopnets.train.data import ImageSplit, digit_image, load_data
from coopnets.train.recipe import create_recipe
from coopnets.train.timm_flags import data_options

TINY = ["--model", "test_resnet", "--img-size", "16", "--limit-train", "64", "--limit-eval", "32",
        "--batch-size", "32", "--profile-repeats", "1", "--no-progress", "--epochs", "1", "--method", "multi_exit"]
TINY_CFG = dict(model="test_resnet", img_size=16, limit_train=64, limit_eval=32, batch_size=32, progress=False,
                profile_repeats=1, epochs=1, method="multi_exit")
CLASSES = {"a": 0, "b": 1, "c": 2}  # ImageFolder class -> the digit its images show


def parse(argv: List[str]) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def trainer(tmp_path: Path, argv: List[str] = (), **fields) -> Trainer:
    """A built (not run) Trainer of the tiny settings plus ``argv`` flags (parsed by the CLI) and ``fields``."""
    cfg = parse([*TINY, "--out", str(tmp_path / "run"), *argv])
    return Trainer(TrainConfig(**{**cfg.__dict__, **fields}), echo=False)


def refused(argv: List[str], capsys) -> str:
    assert coopnets_main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("coopnets train: error: ") and "Traceback" not in err
    return err


def tfs(transform) -> List[object]:
    return list(transform.transforms)


def of_type(transform, cls) -> List[object]:
    return [t for t in tfs(transform) if isinstance(t, cls)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An ImageFolder of digits images: train/ val/ (10 and 4 per class) and tr/ va/ (6 and 3 per class)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("digits_folder")
    for split, count in (("train", 10), ("val", 4), ("tr", 6), ("va", 3)):
        for name, digit in CLASSES.items():
            (root / split / name).mkdir(parents=True)
            images = [img for img, y in zip(digits.images, digits.target) if y == digit][:count]
            for i, img in enumerate(images):
                digit_image(img).save(root / split / name / f"{i}.png")
    return root


def folder_data(folder: Path, argv: List[str]):
    cfg = parse(["--data-dir", str(folder), "--img-size", "16", *argv])
    return load_data(cfg.dataset, cfg.data_dir, cfg.img_size, options=data_options(cfg))


# --- every flag, by timm's name -------------------------------------------------------------
def test_every_flag_of_the_issue_parses_under_timms_name(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("opt_kwargs: {amsgrad: true}\nlr-base: 0.2\n")
    cfg = parse(["-c", str(path), "--drop", "0.2", "--drop-path", "0.1", "--drop-block", "0.05", "--bn-momentum", "0.01",
                 "--bn-eps", "1e-3", "--aa", "rand-m9-mstd0.5", "--reprob", "0.25", "--remode", "const", "--recount", "2",
                 "--scale", "0.5", "1", "--ratio", "0.9", "1.1", "--hflip", "0", "--vflip", "0.5", "--color-jitter", "0.2",
                 "--train-interpolation", "bicubic", "--no-aug", "--aug-repeats", "3", "--mixup-prob", "0.5",
                 "--mixup-switch-prob", "0.3", "--mixup-mode", "elem", "--mixup-off-epoch", "2",
                 "--cutmix-minmax", "0.2", "0.8", "--opt-eps", "1e-6", "--opt-betas", "0.9", "0.99",
                 "--opt-kwargs", "foreach=False", "--lr-base-size", "128", "--lr-base-scale", "sqrt",
                 "--cooldown-epochs", "2", "--sched-on-updates", "--input-size", "1", "24", "24", "--crop-pct", "0.9",
                 "--mean", "0.5", "--std", "0.25", "--interpolation", "bicubic", "--train-split", "tr",
                 "--val-split", "va", "--class-map", "m.txt", "--in-chans", "1", "--gp", "max", "--grad-checkpointing",
                 "--head-init-scale", "0.5", "--log-wandb", "--experiment", "ft", "--wandb-project", "p",
                 "--wandb-tags", "x", "y"])
    assert (cfg.drop, cfg.drop_path, cfg.drop_block, cfg.bn_momentum, cfg.bn_eps) == (0.2, 0.1, 0.05, 0.01, 1e-3)
    assert (cfg.aa, cfg.reprob, cfg.remode, cfg.recount, cfg.scale, cfg.ratio) == (
        "rand-m9-mstd0.5", 0.25, "const", 2, [0.5, 1.0], [0.9, 1.1])
    assert (cfg.hflip, cfg.vflip, cfg.color_jitter, cfg.train_interpolation, cfg.no_aug, cfg.aug_repeats) == (
        0.0, 0.5, 0.2, "bicubic", True, 3.0)
    assert (cfg.mixup_prob, cfg.mixup_switch_prob, cfg.mixup_mode, cfg.mixup_off_epoch, cfg.cutmix_minmax) == (
        0.5, 0.3, "elem", 2, [0.2, 0.8])
    assert (cfg.opt_eps, cfg.opt_betas, cfg.opt_kwargs) == (1e-6, [0.9, 0.99], {"amsgrad": True, "foreach": False})
    assert (cfg.lr, cfg.lr_base, cfg.lr_base_size, cfg.lr_base_scale) == (None, 0.2, 128, "sqrt")  # no --lr: lr-base
    assert (cfg.cooldown_epochs, cfg.sched_on_updates) == (2, True)
    assert (cfg.input_size, cfg.crop_pct, cfg.mean, cfg.std, cfg.interpolation) == ([1, 24, 24], 0.9, [0.5], [0.25],
                                                                                     "bicubic")
    assert (cfg.train_split, cfg.val_split, cfg.class_map, cfg.in_chans) == ("tr", "va", "m.txt", 1)
    assert (cfg.gp, cfg.grad_checkpointing, cfg.head_init_scale) == ("max", True, 0.5)
    assert (cfg.log_wandb, cfg.experiment, cfg.out, cfg.wandb_project, cfg.wandb_tags) == (
        True, "ft", "runs/ft", "p", ["x", "y"])  # the experiment names the run folder when --out is not given
    again = parse(cfg.command().split()[2:])  # the recorded command reproduces the settings
    assert again == cfg


@pytest.mark.parametrize("argv, needle", [
    (["--bn-eps", "1e-3"], "--bn-eps 0.001: timm's test_resnet takes no bn_eps"),
    (["--model", "test_vit", "--drop-block", "0.1"], "--drop-block 0.1: timm's test_vit takes no drop_block_rate"),
    (["--drop-path", "0.1", "--model-kwargs", "drop_path_rate=0.2"], "--drop-path and --model-kwargs drop_path_rate"),
    (["--gp", "token"], "--gp token: Invalid pool type: token"),
    (["--aa", "v9"], "--aa v9: timm's create_transform refuses it (AssertionError: Unknown AA policy v9)"),
    (["--scale", "1", "0.5"], "--scale must be 2 numbers 0 < min <= max (got [1.0, 0.5])"),
    (["--opt", "adamw", "--opt-kwargs", "bogus=1"], "--opt-kwargs bogus=1: timm's optimizer adamw refuses it"),
    (["--class-map", "m.txt"], "--class-map names ImageFolder data: give --data-dir too"),
    (["--interpolation", "cubic"], "--interpolation must be one of nearest, bilinear"),
    (["--mean", "0.1", "0.2"], "--mean must be 1 or 3 values (one per input channel)"),
    (["--reprob", "1.5", "--hflip", "-1"], "--reprob must be in [0, 1] (got 1.5); --hflip must be in [0, 1] (got -1.0)"),
])
def test_what_timm_refuses_is_one_line_before_anything_is_written(tmp_path, capsys, argv, needle):
    assert needle in refused([*TINY, "--out", str(tmp_path / "x"), *argv], capsys)
    assert not (tmp_path / "x").exists()


def test_betas_an_optimizer_has_none_of_are_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="--opt-betas: timm's sgd optimizer takes no betas, so it is ignored"):
        warn_if_misleading(TrainConfig(opt_betas=[0.9, 0.99]), {"opt_betas"})


# --- regularisation and model ---------------------------------------------------------------------
def test_drop_flags_reach_every_net_and_the_checkpoint(tmp_path):
    t = trainer(tmp_path, ["--method", "cooperative", "--drop", "0.2", "--drop-path", "0.1", "--drop-block", "0.05"])
    for name, net in t.recipe.named_children():  # two Teammates and the Leader (a plain timm net)
        backbone = getattr(net, "backbone", net)
        assert backbone.drop_rate == 0.2, name
        assert max(m.drop_prob for m in backbone.modules() if isinstance(m, DropPath)) == pytest.approx(0.1), name
        assert {m.drop_prob for m in backbone.modules() if isinstance(m, DropBlock2d)} == {0.05}, name
    assert {"drop_rate": 0.2, "drop_path_rate": 0.1, "drop_block_rate": 0.05}.items() <= \
        t.recipe.teammate_a.model_args().items()  # rebuilt as trained from a checkpoint
    plain = trainer(tmp_path / "plain")
    assert not any(isinstance(m, (DropPath, DropBlock2d)) for m in plain.recipe.net.modules())


def test_bn_momentum_sets_every_batchnorm_and_bn_eps_reaches_timms_builder(tmp_path):
    t = trainer(tmp_path, ["--bn-momentum", "0.01"])
    bns = [m for m in t.recipe.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and {m.momentum for m in bns} == {0.01}
    t = trainer(tmp_path / "eff", ["--model", "test_efficientnet", "--bn-eps", "1e-3"])
    eps = {m.eps for m in t.recipe.net.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert eps == {1e-3} and t.recipe.net.model_args()["bn_eps"] == 1e-3


def test_gp_grad_checkpointing_head_init_scale_and_in_chans_reach_the_nets(tmp_path):
    t = trainer(tmp_path, ["--gp", "max", "--grad-checkpointing", "--in-chans", "1"])
    net = t.recipe.net
    assert net.backbone.global_pool.pool_type == "max" and net.model_args()["global_pool"] == "max"
    assert all(isinstance(e.pool, SelectAdaptivePool2d) and e.pool.pool_type == "max" for e in net.exits)
    assert net.backbone.grad_checkpointing
    first_conv = next(m for m in net.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert net.in_chans == 1 and first_conv.weight.shape[1] == 1 and t.data.train[0][0].shape[0] == 1
    out = net.forward_exits(t.data.train[0][0][None].repeat(2, 1, 1, 1))
    assert len(out) == net.num_depths
    base = trainer(tmp_path / "base").recipe.net
    scaled = trainer(tmp_path / "scaled", ["--head-init-scale", "0.5"]).recipe.net
    for name in base.classifier_names():  # same seed: the same init, each classifier scaled
        for p in ("weight", "bias"):
            expected = getattr(base.get_submodule(name), p) * 0.5
            assert torch.allclose(getattr(scaled.get_submodule(name), p), expected), name


# --- augmentation, through timm's create_transform ----------------------------------------------------
def test_default_imagefolder_train_transform_is_timms_default(folder):
    tf = folder_data(folder, []).train.transform
    (crop,) = of_type(tf, RandomResizedCropAndInterpolation)
    assert crop.scale == (0.08, 1.0) and of_type(tf, T.RandomHorizontalFlip)[0].p == 0.5
    assert of_type(tf, T.ColorJitter) and not of_type(tf, RandAugment) and not of_type(tf, RandomErasing)
    assert not of_type(tf, T.RandomVerticalFlip)


@pytest.mark.parametrize("argv, check", [
    (["--aa", "rand-m9-mstd0.5"], lambda tf: len(of_type(tf, RandAugment)) == 1 and not of_type(tf, T.ColorJitter)),
    (["--hflip", "0"], lambda tf: not of_type(tf, T.RandomHorizontalFlip)),
    (["--vflip", "0.5"], lambda tf: of_type(tf, T.RandomVerticalFlip)[0].p == 0.5),
    (["--reprob", "0.25", "--remode", "rand", "--recount", "2"],
     lambda tf: [(e.probability, e.rand_color, e.max_count) for e in of_type(tf, RandomErasing)] == [(0.25, True, 2)]),
    (["--scale", "0.5", "1", "--ratio", "0.9", "1.1"],
     lambda tf: (of_type(tf, RandomResizedCropAndInterpolation)[0].scale,
                 of_type(tf, RandomResizedCropAndInterpolation)[0].ratio) == ((0.5, 1.0), (0.9, 1.1))),
    (["--color-jitter", "0.2"], lambda tf: tuple(of_type(tf, T.ColorJitter)[0].brightness) == pytest.approx((0.8, 1.2))),
    (["--train-interpolation", "bicubic"],
     lambda tf: of_type(tf, RandomResizedCropAndInterpolation)[0].interpolation == str_to_interp_mode("bicubic")),
    (["--no-aug", "--aa", "rand-m9-mstd0.5"],
     lambda tf: not of_type(tf, RandomResizedCropAndInterpolation) and not of_type(tf, RandAugment)
     and of_type(tf, T.CenterCrop) and not of_type(tf, T.RandomHorizontalFlip)),
])
def test_augmentation_flags_shape_timms_train_transform(folder, argv, check):
    data = folder_data(folder, argv)
    assert check(data.train.transform)
    assert not of_type(data.val.transform, RandomResizedCropAndInterpolation)  # eval stays deterministic


def test_digits_keeps_its_fixed_pipeline_unless_augmentation_is_asked_for(tmp_path):
    plain = trainer(tmp_path / "p")
    assert isinstance(plain.data.train.dataset, torch.utils.data.TensorDataset)  # .limited() -> Subset
    assert torch.equal(plain.data.train[3][0], plain.data.train[3][0])
    for argv in (["--aa", "rand-m9-mstd0.5"], ["--reprob", "0.25"], ["--hflip", "0.3"]):
        aug = trainer(tmp_path / argv[0][2:], argv)
        split = aug.data.train.dataset
        assert isinstance(split, ImageSplit) and of_type(split.transform, RandomResizedCropAndInterpolation), argv
        assert aug.data.train[0][0].shape == (3, 16, 16)
        assert isinstance(aug.data.val.dataset, torch.utils.data.TensorDataset)  # eval stays fixed
    assert of_type(trainer(tmp_path / "aa2", ["--aa", "rand-m9-mstd0.5"]).data.train.dataset.transform, RandAugment)
    assert isinstance(trainer(tmp_path / "no", ["--aa", "rand-m9-mstd0.5", "--no-aug"]).data.train.dataset,
                      torch.utils.data.TensorDataset)


def test_aug_repeats_uses_timms_repeat_sampler(tmp_path):
    t = trainer(tmp_path, ["--aug-repeats", "3"])
    assert isinstance(t.sampler, RepeatAugSampler) and t.sampler.num_repeats == 3
    order = list(iter(t.sampler))
    assert order[0] == order[1] == order[2] and len(order) == len(t.sampler) > 0


# --- data flags: resolve_data_config, create_dataset ----------------------------------------------------
def test_data_config_flags_reach_timms_data_config_and_eval_transform(folder):
    data = folder_data(folder, ["--input-size", "3", "24", "20", "--crop-pct", "0.8", "--mean", "0.5", "--std",
                                "0.25", "--interpolation", "bicubic"])
    assert data.data_config == {"input_size": (3, 24, 20), "interpolation": "bicubic", "crop_pct": 0.8,
                                "crop_mode": "center", "mean": (0.5,) * 3, "std": (0.25,) * 3}
    resize = tfs(data.val.transform)[0]  # timm's eval resize: 24 x 20 / crop_pct, then the center crop
    assert tuple(resize.size) == (30, 25) and resize.interpolation == str_to_interp_mode("bicubic")
    assert tuple(of_type(data.val.transform, T.CenterCrop)[0].size) == (24, 20)
    (norm,) = of_type(data.val.transform, T.Normalize)
    assert torch.as_tensor(norm.mean).tolist() == [0.5] * 3 and torch.as_tensor(norm.std).tolist() == [0.25] * 3
    assert data.val[0][0].shape == (3, 24, 20) and data.train[0][0].shape == (3, 24, 20)
    grey = folder_data(folder, ["--in-chans", "1", "--mean", "0.5", "--std", "0.5"])
    assert grey.val[0][0].shape == (1, 16, 16) and grey.input_size == (1, 16, 16)  # read as 'L', as timm does


def test_data_config_flags_reach_the_saved_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert coopnets_main(["train", *TINY, "--out", str(out), "--input-size", "1", "20", "20", "--mean", "0.5",
                          "--std", "0.25", "--crop-pct", "0.9", "--interpolation", "bicubic"]) == 0
    config = json.loads((out / "model" / "config.json").read_text())
    cfg = config["pretrained_cfg"]
    assert (cfg["input_size"], cfg["mean"], cfg["std"], cfg["crop_pct"], cfg["interpolation"]) == (
        [1, 20, 20], [0.5], [0.25], 0.9, "bicubic")
    assert config["model_args"]["in_chans"] == 1


def test_class_map_remaps_the_imagefolder_classes(folder, tmp_path):
    class_map = tmp_path / "map.txt"
    class_map.write_text("c\na\n")
    data = folder_data(folder, ["--class-map", str(class_map)])
    assert data.class_names == ["c", "a"] and data.num_classes == 2
    assert sorted(int(y) for _, y in data.train.reader.samples) == [0] * 10 + [1] * 10  # b is dropped
    c_images = [Path(p).parent.name for p, y in data.val.reader.samples if y == 0]
    assert set(c_images) == {"c"} and len(data.val) == 8


def test_train_and_val_split_flags_choose_the_folders(folder, capsys, tmp_path):
    data = folder_data(folder, ["--train-split", "tr", "--val-split", "va"])
    assert (len(data.train), len(data.val)) == (18, 9)
    assert {Path(p).parts[-3] for p, _ in data.train.reader.samples} == {"tr"}
    err = refused(["--data-dir", str(folder), "--val-split", "nope", *TINY, "--out", str(tmp_path / "x")], capsys)
    assert "nope" in err and "--val-split" in err


# --- mixup: timm's Mixup ---------------------------------------------------------------------------
def test_mixup_flags_reach_timms_mixup(tmp_path):
    m = trainer(tmp_path, ["--mixup", "0.8", "--cutmix", "1.0", "--mixup-prob", "0.5", "--mixup-switch-prob", "0.3",
                           "--mixup-mode", "elem", "--cutmix-minmax", "0.2", "0.8"]).mixup
    assert (m.mix_prob, m.switch_prob, m.mode, m.cutmix_minmax) == (0.5, 0.3, "elem", [0.2, 0.8])
    alone = trainer(tmp_path / "alone", ["--cutmix-minmax", "0.2", "0.8"]).mixup  # timm: minmax alone enables cutmix
    assert alone is not None and alone.cutmix_minmax == [0.2, 0.8]
    assert trainer(tmp_path / "none").mixup is None


def test_mixup_off_epoch_turns_mixing_off(tmp_path, monkeypatch):
    t = trainer(tmp_path, ["--mixup", "1.0", "--mixup-off-epoch", "1", "--epochs", "2"])
    seen: Dict[int, List[torch.Tensor]] = {0: [], 1: []}
    step = t.train_step
    epoch = [0]
    monkeypatch.setattr(t, "train_step", lambda x, target, update=True: (seen[epoch[0]].append(target),
                                                                         step(x, target, update))[1])
    for epoch[0] in (0, 1):
        t.train_epoch(epoch[0])
    mixed = torch.cat(seen[0])
    assert ((mixed > 0) & (mixed < 1)).any()  # the first epoch: mixed soft targets
    one_hot = torch.cat(seen[1])
    assert ((one_hot == 0) | (one_hot == 1)).all() and torch.equal(one_hot.sum(1), torch.ones(len(one_hot)))
    assert not t.mixup.mixup_enabled


@pytest.mark.parametrize("method", ["cooperative", "multi_exit", "byot", "ekd", "mlcsd", "independent"])
def test_every_recipes_loss_is_linear_in_mixed_targets_of_every_mixup_mode(method):
    """Mixup/CutMix give soft targets ``lam * a + (1 - lam) * b``: a recipe's loss must then be the same mix of its
    losses on ``a`` and ``b`` (its CE terms take soft targets, its KD terms none), in every mode timm's Mixup has."""
    from timm.data import Mixup

    torch.manual_seed(0)
    recipe = create_recipe(method, model_factory("test_resnet", 5), {"depth": 2} if method == "independent" else {})
    recipe.train()
    x, ya, yb = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]), torch.tensor([4, 3, 2, 1])
    lam = 0.3
    soft = lam * torch.nn.functional.one_hot(ya, 5).float() + (1 - lam) * torch.nn.functional.one_hot(yb, 5).float()
    mixed = recipe(x, soft).loss
    assert torch.allclose(mixed, lam * recipe(x, ya).loss + (1 - lam) * recipe(x, yb).loss, rtol=1e-4, atol=1e-5)
    for mode in ("batch", "pair", "elem"):
        mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=None if mode != "batch" else (0.2, 0.8),
                    mode=mode, num_classes=5, label_smoothing=0.1)
        xm, target = mix(x.clone(), ya)
        assert target.shape == (4, 5) and torch.allclose(target.sum(1), torch.ones(4))
        loss = recipe(xm, target).loss
        assert torch.isfinite(loss)
        loss.backward()


# --- optimiser and schedule: create_optimizer_v2, create_scheduler_v2 ----------------------------------
def test_optimizer_flags_reach_the_param_groups(tmp_path):
    t = trainer(tmp_path, ["--opt", "adamw", "--opt-betas", "0.9", "0.99", "--opt-eps", "1e-6",
                           "--opt-kwargs", "amsgrad=True"])
    assert isinstance(t.optimizer, torch.optim.AdamW)
    assert {(g["betas"], g["eps"], g["amsgrad"]) for g in t.optimizer.param_groups} == {((0.9, 0.99), 1e-6, True)}


@pytest.mark.parametrize("argv, lr", [
    (["--lr-base", "0.4"], 0.4 * 32 / 256),  # sgd: linear in the global batch
    (["--lr-base", "0.4", "--opt", "adamw"], 0.4 * (32 / 256) ** 0.5),  # ada*: sqrt
    (["--lr-base", "0.4", "--lr-base-size", "64", "--lr-base-scale", "sqrt"], 0.4 * 0.5 ** 0.5),
    (["--lr-base", "0.4", "--grad-accum-steps", "2"], 0.4 * 64 / 256),
    (["--lr-base", "0.4", "--lr", "0.01"], 0.01),  # --lr overrides --lr-base
])
def test_lr_base_scales_the_lr_by_the_global_batch(tmp_path, argv, lr):
    t = trainer(tmp_path, argv)
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(lr)


def test_cooldown_epochs_train_after_the_schedule_at_min_lr(tmp_path):
    t = trainer(tmp_path, ["--epochs", "1", "--cooldown-epochs", "1", "--min-lr", "1e-4", "--lr", "0.1"])
    assert t.num_epochs == 2  # timm's create_scheduler_v2: the cycle plus the cooldown
    t.fit()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [(r["epoch"], r["lr"]) for r in lines if not r.get("final")]
    assert epochs == [(1, pytest.approx(1e-4)), (2, pytest.approx(1e-4))]  # the extra epoch trains at min_lr


@pytest.mark.parametrize("on_updates", [True, False])
def test_sched_on_updates_steps_the_lr_every_update(tmp_path, monkeypatch, on_updates):
    argv = ["--limit-train", "128", "--warmup-epochs", "1", "--warmup-lr", "0.001", "--lr", "0.1", "--epochs", "2"]
    t = trainer(tmp_path, argv + (["--sched-on-updates"] if on_updates else []))
    lrs: List[float] = []
    step = t.optimizer.step
    monkeypatch.setattr(t.optimizer, "step", lambda *a, **k: (lrs.append(t.optimizer.param_groups[0]["lr"]),
                                                              step(*a, **k))[1])
    t.train_epoch(0)
    assert len(lrs) == 4  # 128 images, batches of 32
    if on_updates:  # timm's warmup over 1 epoch = 4 updates, one step per update
        assert lrs == pytest.approx([0.001 + k * (0.1 - 0.001) / 4 for k in range(4)])
    else:
        assert lrs == pytest.approx([0.001] * 4)


@pytest.mark.parametrize("on_updates", [False, True])
def test_sched_none_trains_at_a_constant_lr_as_in_timm(tmp_path, monkeypatch, on_updates):
    """timm's ``create_scheduler_v2(sched="none")`` is ``None``: the optimizer's lr is never touched (warmup and
    min-lr flags do not apply), every update and epoch at ``--lr``; ``last.pth`` records no schedule and resumes."""
    argv = ["--sched", "none", "--lr", "0.05", "--warmup-epochs", "1", "--warmup-lr", "0.001", "--min-lr", "1e-4",
            "--limit-train", "64", "--epochs", "2"] + (["--sched-on-updates"] if on_updates else [])
    t = trainer(tmp_path, argv)
    assert t.scheduler is None and t.num_epochs == 2
    with pytest.warns(UserWarning, match=r"--sched none keeps the lr constant, so --warmup-epochs, --warmup-lr, --min-lr"):
        warn_if_misleading(t.cfg, {"warmup_epochs", "warmup_lr", "min_lr", "lr"})
    lrs: List[float] = []
    step = t.optimizer.step
    monkeypatch.setattr(t.optimizer, "step", lambda *a, **k: (lrs.append(t.optimizer.param_groups[0]["lr"]),
                                                              step(*a, **k))[1])
    t.fit()
    assert lrs == [0.05] * 4  # 2 epochs of 64 images in batches of 32
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["lr"]) for r in records if not r.get("final")] == [(1, 0.05), (2, 0.05)]
    resumed = trainer(tmp_path, [*argv, "--epochs", "3"], resume=True)  # the last --epochs counts
    assert resumed.scheduler is None and resumed.start_epoch == 2
    resumed.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records if not r.get("final")] == [0.05] * 3


# --- the done criterion: a timm user's fine-tuning command, from the CLI -----------------------------------
def wandb_records(run_file: str):
    """The records of a wandb ``.wandb`` file (LevelDB log blocks of protobuf ``Record``s)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(run_file).read_bytes()
    pos, block, chunk = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def test_a_timm_fine_tuning_command_runs_and_its_options_reach_timm(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # wandb is a test dependency (setup.cfg's test extra)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    trainers: List[Trainer] = []
    fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self: (trainers.append(self), fit(self))[1])
    out = tmp_path / "ft"
    assert coopnets_main([
        "train", "--data-dir", str(folder), "--model", "test_resnet", "--img-size", "16", "--method", "multi_exit",
        "--epochs", "1", "--batch-size", "10", "--no-progress", "--profile-repeats", "1", "--out", str(out),
        "--opt", "adamw", "--lr", "1e-3", "--drop-path", "0.1", "--aa", "rand-m9-mstd0.5", "--reprob", "0.25",
        "--opt-betas", "0.9", "0.99", "--log-wandb", "--experiment", "digits-ft"]) == 0
    (t,) = trainers
    net = t.recipe.net
    assert max(m.drop_prob for m in net.backbone.modules() if isinstance(m, DropPath)) == pytest.approx(0.1)
    tf = t.data.train.transform
    assert len(of_type(tf, RandAugment)) == 1 and [e.probability for e in of_type(tf, RandomErasing)] == [0.25]
    assert {g["betas"] for g in t.optimizer.param_groups} == {(0.9, 0.99)}
    model_config = json.loads((out / "model" / "config.json").read_text())
    assert model_config["model_args"]["drop_path_rate"] == 0.1  # the published net is rebuilt with it
    command = json.loads((out / "config.json").read_text())["command"]
    for part in ("--drop-path 0.1", "--aa rand-m9-mstd0.5", "--reprob 0.25", "--opt-betas 0.9 0.99", "--log-wandb"):
        assert part in command
    (run_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = list(wandb_records(run_file))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "digits-ft"
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert (config["drop_path"], config["aa"], config["reprob"], config["opt_betas"]) == (
        0.1, "rand-m9-mstd0.5", 0.25, [0.9, 0.99])

    def items(kind: str, field: str) -> List[Dict[str, object]]:
        return [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in getattr(getattr(r, kind), field)}
                for r in records if r.WhichOneof("record_type") == kind]

    (epoch,) = items("history", "item")  # one line per epoch, metrics.jsonl's record
    assert epoch["epoch"] == 1 and 0 <= epoch["val_accuracy/net/depth1"] <= 1 and "train_loss" in epoch
    summary = {k: v for update in items("summary", "update") for k, v in update.items()}
    assert 0 <= summary["test_accuracy/depth4"] <= 1
