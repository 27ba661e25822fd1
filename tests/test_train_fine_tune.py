"""Issue 12, the rest of timm's train.py: EMA, best epochs, layer decay over recipes, torch.compile,
SyncBatchNorm, Hub starts, and the fine-tuning command a timm user would write, end to end."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import pytest
import safetensors.torch
import torch

from coopnets.cli import main as coopnets_main
from coopnets.train import TrainConfig, Trainer, train
from coopnets.train.best import score_of
from coopnets.train.distributed import DistInfo
from coopnets.train.state import CHECKPOINT, load_checkpoint

from hub_server import hub, hub_server, publish_timm_weights  # noqa: F401  (pytest fixtures)
from test_train_options import TINY, TINY_CFG, refused, snapshot


def records(run: Path) -> List[Dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def published(run: Path) -> Dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(run / "model" / "model.safetensors"))


def same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_model_ema_is_validated_at_every_depth_and_published(tmp_path):
    run = tmp_path / "ema"
    summary = train(TrainConfig(out=str(run), **{**TINY_CFG, "epochs": 2}, model_ema=True, model_ema_decay=0.5,
                                checkpoint_hist=0), echo=False)
    first = records(run)[0]["val_accuracy"]
    assert set(first) == {"net", "net_ema"} and len(first["net_ema"]) == 4
    assert summary["deployable"] == "net_ema"
    state = load_checkpoint(run / CHECKPOINT)
    ema = {k[len("module.net."):]: v for k, v in state["ema"].items() if k.startswith("module.net.")}  # ModelEmaV3
    raw = {k[len("net."):]: v for k, v in state["recipe"].items() if k.startswith("net.")}
    assert same(published(run), ema) and not same(ema, raw)  # the EMA weights, which differ from the trained ones
    assert same(safetensors.torch.load_file(str(run / "net.safetensors")), raw)  # the trained net is kept too


def test_the_best_epoch_by_the_eval_metric_is_kept_and_published(tmp_path):
    run = tmp_path / "best"
    summary = train(TrainConfig(out=str(run), **{**TINY_CFG, "epochs": 3}, lr=0.2, checkpoint_hist=2,
                                eval_metric="min_accuracy"), echo=False)
    scores = [score_of(r["val_accuracy"]["net"], "min_accuracy") for r in records(run) if "final" not in r]
    ranked = sorted(range(1, 4), key=lambda e: (-scores[e - 1], e))
    assert summary["selected_epoch"] == ranked[0]
    assert sorted(p.name for p in run.glob("best-*.pth")) == sorted(f"best-{e}.pth" for e in ranked[:2])
    kept = torch.load(run / f"best-{ranked[0]}.pth", weights_only=True)
    net = {k[len("net."):]: v for k, v in kept["recipe"].items() if k.startswith("net.")}
    assert same(published(run), net)
    assert "optimizer" not in kept and load_checkpoint(run / CHECKPOINT)["best"][0][1] == ranked[0]
    assert summary["val_accuracy"] == kept["val_accuracy"]


def test_checkpoint_hist_zero_publishes_the_last_epoch_and_resume_keeps_the_ledger(tmp_path):
    last = tmp_path / "last"
    train(TrainConfig(out=str(last), **TINY_CFG, checkpoint_hist=0), echo=False)
    state = load_checkpoint(last / CHECKPOINT)
    assert not list(last.glob("best-*.pth")) and state["best"] == []
    assert same(published(last), {k[len("net."):]: v for k, v in state["recipe"].items() if k.startswith("net.")})

    run = tmp_path / "resumed"
    train(TrainConfig(out=str(run), **TINY_CFG), echo=False)
    train(TrainConfig(out=str(run), **{**TINY_CFG, "epochs": 2}, resume=True), echo=False)
    ledger = load_checkpoint(run / CHECKPOINT)["best"]
    assert len(ledger) == 1 and [p.name for p in run.glob("best-*.pth")] == [f"best-{ledger[0][1]}.pth"]


def test_layer_decay_reaches_every_net_of_a_recipe(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "ld"), **{**TINY_CFG, "method": "cooperative"}, layer_decay=0.5)
    trainer = Trainer(cfg, echo=False)
    scale = {id(p): g["lr_scale"] for g in trainer.optimizer.param_groups for p in g["params"]}
    recipe = trainer.recipe
    for net in ("teammate_a.backbone.", "teammate_b.backbone.", "leader."):
        assert scale[id(recipe.get_parameter(net + "fc.weight"))] == 1.0
        assert scale[id(recipe.get_parameter(net + "conv1.0.weight"))] == 0.5 ** 5
    assert scale[id(recipe.get_parameter("teammate_a.exits.1.fc.weight"))] == 0.5 ** 3  # with its stage (layer2)
    assert trainer.fit()["test_accuracy"]


def test_layer_decay_keeps_vit_tokens_out_of_weight_decay_in_every_net(tmp_path):
    from timm.optim import create_optimizer_v2

    import coopnets
    from coopnets.train import create_recipe

    recipe = create_recipe("multi_exit", lambda: coopnets.wrap("test_vit", num_classes=3))
    opt = create_optimizer_v2(recipe, "adamw", weight_decay=0.05, layer_decay=0.75)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay[id(recipe.net.backbone.pos_embed)] == 0.0 and decay[id(recipe.net.backbone.cls_token)] == 0.0
    assert decay[id(recipe.net.backbone.blocks[0].attn.qkv.weight)] == 0.05


def test_torchcompile_step_matches_the_eager_step(tmp_path):
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 10
    losses = []
    for backend in (None, "aot_eager"):
        torch.manual_seed(0)
        trainer = Trainer(TrainConfig(out=str(tmp_path / str(backend)), **TINY_CFG, torchcompile=backend), echo=False)
        losses.append([trainer.train_step(x, y).loss.item() for _ in range(2)])  # the 2nd after an update
    assert losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-5)


def test_torchcompile_without_a_backend_is_inductor_and_unknown_backends_are_refused(tmp_path, capsys):
    from coopnets.cli.train import add_arguments
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--torchcompile"]).torchcompile == "inductor"
    err = refused([*TINY, "--torchcompile", "nope", "--out", str(tmp_path / "x")], capsys)
    assert "--torchcompile must be one of" in err and "inductor" in err and not (tmp_path / "x").exists()


def test_sync_bn_is_refused_for_cpu_ddp_before_anything_is_written(tmp_path, monkeypatch, capsys):
    import coopnets.train.trainer as trainer_module

    fake = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    monkeypatch.setattr(trainer_module.ddp, "init_distributed", lambda device=None: fake)
    err = refused([*TINY, "--sync-bn", "--out", str(tmp_path / "sbn")], capsys)
    assert "--sync-bn needs CUDA" in err and not (tmp_path / "sbn").exists()


def test_sync_bn_in_one_process_keeps_batchnorm(tmp_path):
    trainer = Trainer(TrainConfig(out=str(tmp_path / "one"), **TINY_CFG, sync_bn=True), echo=False)
    kinds = {type(m).__name__ for m in trainer.recipe.modules()}
    assert "BatchNorm2d" in kinds and "SyncBatchNorm" not in kinds


def test_training_continues_from_a_hub_checkpoint(hub, tmp_path):
    from coopnets.hub import push_to_hub

    start = tmp_path / "start"
    train(TrainConfig(out=str(start), **TINY_CFG), echo=False)
    push_to_hub(str(start / "model"), "me/coop-test")
    run = tmp_path / "continued"
    assert coopnets_main(["train", *TINY, "--model", "hf-hub:me/coop-test", "--lr", "0", "--warmup-lr", "0",
                          "--weight-decay", "0", "--out", str(run)]) == 0
    before, after = published(start), published(run)
    assert all(torch.equal(after[k], v) for k, v in before.items() if v.is_floating_point() and "running" not in k)
    assert any("/me/coop-test/resolve/" in str(r) for r in hub.requests)


def _digits_folder(root: Path, per_class: int = 6) -> Path:
    from coopnets.train.data import digit_image
    from sklearn.datasets import load_digits

    data = load_digits()
    for split, offset in (("train", 0), ("val", per_class)):
        for label in range(10):
            images = data.images[data.target == label][offset:offset + per_class]
            (root / split / str(label)).mkdir(parents=True)
            for i, image in enumerate(images):
                digit_image(image).save(root / split / str(label) / f"{i}.png")
    return root


def test_a_timm_users_fine_tuning_command_works_end_to_end(hub, tmp_path, capsys):
    """The issue's command, with a small model from the local Hub and a small ImageFolder."""
    weights = publish_timm_weights("timm/test_resnet.r160_in1k")
    data, run = _digits_folder(tmp_path / "data"), tmp_path / "R"
    argv = ["train", "--data-dir", str(data), "--model", "test_resnet", "--pretrained", "--img-size", "32",
            "--opt", "adamw", "--lr", "1e-3", "--sched", "cosine", "--warmup-epochs", "1", "--mixup", "0.2",
            "--model-ema", "--amp", "--epochs", "2", "--batch-size", "20", "--method", "multi_exit",
            "--profile-repeats", "1", "--no-progress", "--out", str(run)]
    assert coopnets_main(argv) == 0
    assert any("test_resnet.r160_in1k" in str(r) for r in hub.requests)
    final = records(run)[-1]
    assert final["deployable"] == "net_ema" and len(final["test_accuracy"]["net_ema"]) == 4
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32] and config["pretrained_cfg"]["num_classes"] == 10
    saved = published(run)
    assert saved["backbone.conv1.0.weight"].shape == weights["conv1.0.weight"].shape
    assert not torch.equal(saved["backbone.conv1.0.weight"], weights["conv1.0.weight"])  # it trained
    before = snapshot(run)
    err = refused([*argv[1:], "--resume", "--lr", "1e-2"], capsys)
    assert "--lr 0.01 (saved 0.001)" in err and snapshot(run) == before


def test_layer_decay_on_a_backbone_without_group_matcher_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    import timm.models.resnet

    monkeypatch.delattr(timm.models.resnet.ResNet, "group_matcher")
    err = refused([*TINY, "--layer-decay", "0.7", "--out", str(tmp_path / "ld")], capsys)
    assert "--layer-decay" in err and "no group_matcher" in err and not (tmp_path / "ld").exists()
