"""Issue 12: safe resume and input checks, pretrained starts, timm's loop options."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict

import pytest
import safetensors.torch
import torch

from coopnets.cli import main as coopnets_main
from coopnets.train import TrainConfig, Trainer, train
from coopnets.train.state import CHECKPOINT, load_checkpoint

from hub_server import hub, hub_server, publish_timm_weights  # noqa: F401  (pytest fixtures)

TINY = ["--model", "test_resnet", "--img-size", "16", "--limit-train", "64", "--limit-eval", "32",
        "--batch-size", "32", "--profile-repeats", "1", "--no-progress", "--epochs", "1", "--method", "multi_exit"]
TINY_CFG = dict(model="test_resnet", img_size=16, limit_train=64, limit_eval=32, batch_size=32, progress=False,
                profile_repeats=1, epochs=1, method="multi_exit")


def snapshot(folder: Path) -> Dict[str, str]:
    """sha256 of every file under ``folder`` (plus the listing), to assert nothing changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(argv, capsys) -> str:
    assert coopnets_main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("coopnets train: error: ") and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "run"
    assert coopnets_main(["train", *TINY, "--out", str(run)]) == 0
    return run


# --- A: resume safety and input checks -----------------------------------------------------
@pytest.mark.parametrize("change, names", [
    (["--lr", "0.1"], ["--lr 0.1 (saved 0.05)"]),
    (["--model", "resnet18"], ["--model resnet18 (saved test_resnet)"]),
    (["--method", "byot"], ["--method byot (saved multi_exit)"]),
    (["--seed", "5", "--batch-size", "16"], ["--batch-size 16 (saved 32)", "--seed 5 (saved 0)"]),
])
def test_resume_with_other_settings_is_refused_listing_each_difference(finished_run, capsys, change, names):
    before = snapshot(finished_run)
    err = refused([*TINY, "--out", str(finished_run), "--resume", *change], capsys)
    assert "settings differ" in err and "--epochs" in err
    for name in names:
        assert name in err
    assert snapshot(finished_run) == before


def test_resume_may_change_epochs_and_runtime_fields(tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(out=str(run), **TINY_CFG), echo=False)
    summary = train(TrainConfig(out=str(run), **{**TINY_CFG, "epochs": 2, "workers": 1, "profile_repeats": 2},
                                resume=True), echo=False)
    assert summary["epochs"] == 2 and load_checkpoint(run / CHECKPOINT)["epoch"] == 2
    assert json.loads((run / "config.json").read_text())["epochs"] == 2


@pytest.mark.parametrize("damage", ["truncate", "foreign", "garbage"])
def test_truncated_or_foreign_checkpoint_is_a_one_line_error(tmp_path, capsys, damage):
    run = tmp_path / "run"
    assert coopnets_main(["train", *TINY, "--out", str(run)]) == 0
    ckpt = run / CHECKPOINT
    if damage == "truncate":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif damage == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, ckpt)
    else:
        ckpt.write_bytes(b"not a checkpoint at all")
    before = snapshot(run)
    err = refused([*TINY, "--out", str(run), "--resume"], capsys)
    assert str(ckpt) in err and "another --out" in err
    assert snapshot(run) == before


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--img-size", "-1"), ("--batch-size", "0"),
                                         ("--lr", "-0.1"), ("--grad-accum-steps", "0"), ("--smoothing", "1.5")])
def test_invalid_numbers_are_refused_before_anything_is_written(tmp_path, capsys, flag, value):
    run = tmp_path / "run"
    err = refused([*TINY, "--out", str(run), flag, value], capsys)
    assert f"{flag} must be" in err
    assert not run.exists()


def test_invalid_numbers_on_resume_leave_the_run_untouched(finished_run, capsys):
    before = snapshot(finished_run)
    err = refused([*TINY, "--out", str(finished_run), "--resume", "--epochs", "-3"], capsys)
    assert "--epochs must be > 0" in err and snapshot(finished_run) == before


def test_a_new_run_into_a_finished_folder_is_refused_untouched(finished_run, capsys):
    before = snapshot(finished_run)
    assert "already holds a run" in refused([*TINY, "--out", str(finished_run)], capsys)
    assert snapshot(finished_run) == before


# --- B: pretrained starts and model build ----------------------------------------------------
def test_pretrained_starts_from_timms_weights_through_timms_loading(hub, tmp_path):
    # test_resnet's default tag resolves to hf_hub_id timm/test_resnet.r160_in1k, served by the local Hub
    weights = publish_timm_weights("timm/test_resnet.r160_in1k")
    cfg = TrainConfig(out=str(tmp_path / "run"), **{**TINY_CFG, "method": "cooperative"}, pretrained=True)
    trainer = Trainer(cfg, echo=False)
    for net in (trainer.recipe.teammate_a.backbone, trainer.recipe.teammate_b.backbone, trainer.recipe.leader):
        state = net.state_dict()
        for key, value in weights.items():
            if not key.startswith("fc."):  # the classifier is re-initialised for the dataset's 10 classes
                assert torch.equal(state[key], value), key
    assert ("GET", "/timm/test_resnet.r160_in1k/resolve/main/model.safetensors") in hub.requests or any(
        "test_resnet.r160_in1k" in str(r) for r in hub.requests)


def test_pretrained_cli_with_lr_zero_saves_exactly_the_pretrained_backbone(hub, tmp_path):
    weights = publish_timm_weights("timm/test_resnet.r160_in1k")
    run = tmp_path / "ft"
    assert coopnets_main(["train", *TINY, "--pretrained", "--lr", "0", "--warmup-lr", "0", "--weight-decay", "0",
                          "--out", str(run)]) == 0
    saved = safetensors.torch.load_file(str(run / "model" / "model.safetensors"))
    for key, value in weights.items():
        if not key.startswith("fc.") and value.is_floating_point() and "running" not in key:
            assert torch.equal(saved["backbone." + key], value), key


def test_fixed_leader_is_frozen_in_eval_mode_and_has_no_optimizer_state(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "run"), **{**TINY_CFG, "method": "cooperative"},
                      recipe_opts={"fixed_leader": True})
    trainer = Trainer(cfg, echo=False)
    leader_before = {k: v.clone() for k, v in trainer.recipe.leader.state_dict().items()}
    trainer.recipe.train()
    assert not trainer.recipe.leader.training and trainer.recipe.teammate_a.training
    trainer.fit()
    after = trainer.recipe.leader.state_dict()
    assert all(torch.equal(leader_before[k], after[k]) for k in after)  # BN statistics too: eval mode
    leader_params = {id(p) for p in trainer.recipe.leader.parameters()}
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not leader_params & opt_params
    n_opt = len(load_checkpoint(Path(cfg.out) / CHECKPOINT)["optimizer"]["state"])
    n_trainable = sum(1 for p in trainer.recipe.parameters() if p.requires_grad)
    assert n_opt == n_trainable


def test_vit_trains_at_a_size_of_its_choice_and_model_kwargs_reach_timm(tmp_path):
    from coopnets.train.build import model_factory

    net = model_factory("coop_vit_small_patch16_224", 10, img_size=32, model_kwargs={"drop_path_rate": 0.1})()
    assert net.backbone.patch_embed.img_size == (32, 32)
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert net.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)


def test_initial_checkpoint_continues_a_run_and_new_classes_reset_only_classifiers(finished_run, tmp_path):
    from coopnets.train.build import model_factory

    start = safetensors.torch.load_file(str(finished_run / "model" / "model.safetensors"))
    same = model_factory("test_resnet", 10, initial_checkpoint=str(finished_run / "model"))().state_dict()
    assert all(torch.equal(same[k], v) for k, v in start.items())
    other = model_factory("test_resnet", 7, initial_checkpoint=f"local-dir:{finished_run / 'model'}")()
    state = other.state_dict()
    assert other.num_classes == 7 and state["backbone.fc.weight"].shape[0] == 7
    assert torch.equal(state["backbone.conv1.0.weight"], start["backbone.conv1.0.weight"])
    with pytest.raises(ValueError, match="does not fit --model resnet18"):
        model_factory("resnet18", 10, initial_checkpoint=str(finished_run / "model"))()


# --- C: loop options --------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["cooperative", "multi_exit", "byot", "ekd", "mlcsd", "independent"])
def test_every_recipe_trains_under_mixup_and_cutmix(tmp_path, method):
    opts = {"depth": 2} if method == "independent" else {}
    summary = train(TrainConfig(out=str(tmp_path / method), **{**TINY_CFG, "method": method}, mixup=0.8, cutmix=1.0,
                                smoothing=0.1, recipe_opts=opts), echo=False)
    record = json.loads((tmp_path / method / "metrics.jsonl").read_text().splitlines()[0])
    assert all(0.0 <= a <= 1.0 for a in record["train_accuracy"]) and record["train_loss"] > 0
    assert len(summary["test_accuracy"]) == 4


def test_soft_target_ce_matches_timm():
    from timm.loss import SoftTargetCrossEntropy

    from coopnets.train.losses import ce

    z, t = torch.randn(6, 5), torch.softmax(torch.randn(6, 5), -1)
    assert torch.allclose(ce(z, t), SoftTargetCrossEntropy()(z, t))


@pytest.mark.parametrize("extra", [
    dict(momentum=0.5, clip_grad=1.0, clip_mode="norm"), dict(clip_grad=0.1, clip_mode="value"),
    dict(sched="step", decay_epochs=1, decay_rate=0.5, warmup_epochs=1, warmup_lr=1e-3, min_lr=1e-4),
    dict(grad_accum_steps=2, channels_last=True), dict(amp_dtype="bfloat16", device="cpu"),
])
def test_loop_options_run_a_tiny_training(tmp_path, extra):
    summary = train(TrainConfig(out=str(tmp_path / "run"), **{**TINY_CFG, "epochs": 2}, **extra), echo=False)
    assert len(summary["test_accuracy"]) == 4


def test_step_schedule_uses_decay_epochs_rate_and_warmup(tmp_path):
    t = Trainer(TrainConfig(out=str(tmp_path / "r"), **{**TINY_CFG, "epochs": 4}, sched="step", lr=0.1,
                            decay_epochs=1, decay_rate=0.5, warmup_epochs=1, warmup_lr=0.01), echo=False)
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    t.scheduler.step(2)
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 2)


def test_grad_accum_steps_once_per_two_batches(tmp_path, monkeypatch):
    t = Trainer(TrainConfig(out=str(tmp_path / "r"), **{**TINY_CFG, "limit_train": 128}, grad_accum_steps=2),
                echo=False)
    steps = []
    original = t.optimizer.step
    monkeypatch.setattr(t.optimizer, "step", lambda *a, **k: (steps.append(1), original(*a, **k))[1])
    t.train_epoch(0)
    assert len(steps) == 2  # 4 batches of 32


def test_bfloat16_autocast_on_cpu(tmp_path):
    t = Trainer(TrainConfig(out=str(tmp_path / "r"), **TINY_CFG, amp_dtype="bfloat16", device="cpu"), echo=False)
    x, y = next(iter(t.train_loader))
    out = t.train_step(x, y)
    assert t.use_amp and out.logits[0].dtype == torch.bfloat16


def test_yaml_config_is_overridden_by_the_command_line(tmp_path, capsys):
    import argparse

    from coopnets.cli.train import add_arguments, config_from_args

    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.2\nepochs: 7\nmodel-kwargs: {drop_path_rate: 0.1}\nrecipe_opts: {temperature: 2}\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(["-c", str(path), "--epochs", "3"]))
    assert (cfg.lr, cfg.epochs, cfg.model_kwargs, cfg.recipe_opts) == (0.2, 3, {"drop_path_rate": 0.1},
                                                                       {"temperature": 2})
    # an explicit flag equal to the default still wins over the file
    assert config_from_args(parser.parse_args(["-c", str(path), "--lr", "0.05"])).lr == 0.05
    path.write_text("nope: 1\n")
    assert "unknown setting(s) ['nope']" in refused(["-c", str(path), "--out", str(tmp_path / "x")], capsys)
    assert not (tmp_path / "x").exists()


def test_help_shows_defaults_and_version(capsys):
    assert coopnets_main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "(default: 0.05)" in out and "--clip-mode" in out
    assert coopnets_main(["train", "--version"]) == 0 and "coopnets " in capsys.readouterr().out
