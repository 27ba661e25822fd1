"""The shared trainer and the CLI (issue 3): resume equality, run-folder safety, end-to-end outputs."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import coopnets
from coopnets.cli import main as coopnets_main
from coopnets.train import TrainConfig, Trainer, load_data, train
from coopnets.train import build as build_mod
from coopnets.train import trainer as trainer_mod
from coopnets.train.state import CHECKPOINT, load_checkpoint

TINY = dict(model="test_resnet", img_size=16, limit_train=64, limit_eval=32, batch_size=32,
            progress=False, profile_repeats=1, seed=3)


def _epochs(run: Path):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "epoch" in r]


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    full = Trainer(TrainConfig(out=str(tmp_path / "full"), epochs=2, **TINY), echo=False)
    full.fit()

    calls = []
    original = trainer_mod.save_atomic

    def crash_after_first_checkpoint(obj, path):
        original(obj, path)
        calls.append(path)
        raise KeyboardInterrupt("simulated crash after epoch 1")

    monkeypatch.setattr(trainer_mod, "save_atomic", crash_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        Trainer(TrainConfig(out=str(tmp_path / "cut"), epochs=2, **TINY), echo=False).fit()
    monkeypatch.setattr(trainer_mod, "save_atomic", original)
    assert load_checkpoint(tmp_path / "cut" / CHECKPOINT)["epoch"] == 1
    resumed = Trainer(TrainConfig(out=str(tmp_path / "cut"), epochs=2, resume=True, **TINY), echo=False)
    assert resumed.start_epoch == 1
    resumed.fit()

    a, b = full.recipe.state_dict(), resumed.recipe.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    assert strip(_epochs(tmp_path / "full")) == strip(_epochs(tmp_path / "cut"))
    assert len(_epochs(tmp_path / "cut")) == 2


def test_run_folder_is_never_overwritten_and_resume_needs_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / CHECKPOINT).write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="--resume"):
        train(TrainConfig(out=str(run), epochs=1, **TINY), echo=False)
    assert (run / CHECKPOINT).read_bytes() == b"precious"
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(TrainConfig(out=str(tmp_path / "empty"), epochs=1, resume=True, **TINY), echo=False)


def test_cli_end_to_end_writes_metrics_table_plot_and_safetensors(tmp_path, capsys):
    run = tmp_path / "cli"
    argv = ["train", "--model", "test_resnet", "--dataset", "digits", "--method", "cooperative", "--epochs", "1",
            "--img-size", "16", "--limit-train", "64", "--limit-eval", "32", "--batch-size", "32",
            "--profile-repeats", "1", "--no-progress", "--recipe-opt", "temperature=2", "--out", str(run)]
    assert coopnets_main(argv) == 0
    printed = capsys.readouterr().out
    assert "| depth | accuracy |" in printed
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("epoch") for r in records] == [1, None] and records[-1]["final"]
    assert len(records[0]["val_accuracy"]["teammate_a"]) == 4
    assert json.loads((run / "config.json").read_text())["recipe_opts"] == {"temperature": 2}
    assert (run / "results.md").read_text().count("\n| ") == 5 and (run / "results.png").stat().st_size > 0
    deployed = records[-1]["deployable"]
    other = ({"teammate_a", "teammate_b"} - {deployed}).pop()
    for name in (other, "leader"):
        assert (run / f"{name}.safetensors").is_file()
    fresh = coopnets.wrap("test_resnet", num_classes=10)
    fresh.load_state_dict(load_file(str(run / "model" / "model.safetensors")))  # strict: every key matches
    # the Leader, a plain network trained in the same run, is scored on the test split as the run's own baseline
    leader = timm.create_model("test_resnet", num_classes=10)
    leader.load_state_dict(load_file(str(run / "leader.safetensors")))
    test_loader = build_mod.make_loader(load_data("digits", img_size=16).limited(64, 32).test, 32, 0)
    expected = trainer_mod.evaluate(leader, test_loader, torch.device("cpu"))[0]
    assert records[-1]["reference_test_accuracy"] == {"leader": expected}
    assert f"leader {expected:.4f}" in (run / "results.md").read_text()
    assert coopnets_main(argv) == 2 and "already holds a run" in capsys.readouterr().err


def test_cli_rejects_unknown_methods_listing_the_valid_ones(capsys):
    assert coopnets_main(["train", "--method", "nope"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and "cooperative" in err and "multi_exit" in err


def test_trainer_runs_a_recipe_that_leaves_parameters_unused(tmp_path):
    summary = train(TrainConfig(out=str(tmp_path / "ind"), method="independent", epochs=1,
                                recipe_opts={"depth": 2}, **TINY), echo=False)
    assert summary["deployable"] == "net" and len(summary["per_depth"]) == 4


def test_independent_without_depth_trains_every_depth_alone(tmp_path):
    out = tmp_path / "alone"
    summary = train(TrainConfig(out=str(out), method="independent", epochs=1, **TINY), echo=False)
    runs = [out / f"depth{d}" for d in range(1, 5)]
    assert summary["runs"] == [str(r) for r in runs]
    for depth, run in enumerate(runs, start=1):
        final = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("final")][0]
        # the combined table takes depth d from the run that trained depth d
        assert summary["test_accuracy"][depth - 1] == final["test_accuracy"]["net"][depth - 1]
        assert json.loads((run / "config.json").read_text())["recipe_opts"] == {"depth": depth}
    assert summary["wall_time_s"] == pytest.approx(sum(summary["run_wall_time_s"]))
    assert [r["depth"] for r in summary["per_depth"]] == [1, 2, 3, 4]
    assert (out / "results.md").is_file() and (out / "results.png").stat().st_size > 0
    assert "One run per depth" in (out / "results.md").read_text()

    # resume keeps finished runs as they are and starts the missing ones
    before = (runs[0] / "model" / "model.safetensors").read_bytes()
    shutil.rmtree(runs[3])
    again = train(TrainConfig(out=str(out), method="independent", epochs=1, resume=True, **TINY), echo=False)
    assert (runs[0] / "model" / "model.safetensors").read_bytes() == before
    assert again["test_accuracy"][:3] == summary["test_accuracy"][:3]
    assert (runs[3] / CHECKPOINT).is_file()


def test_recorded_command_reproduces_the_config(tmp_path):
    import argparse
    import shlex

    from coopnets.cli.train import add_arguments, config_from_args

    cfg = TrainConfig(out=str(tmp_path / "r un"), model="coop_resnet18", method="mlcsd", epochs=3, lr=0.1, amp=False,
                      deterministic=True, progress=False, limit_train=64, recipe_opts={"temperature": 3.0, "kd_weight": 2})
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = shlex.split(cfg.command())
    assert argv[:2] == ["coopnets", "train"]
    assert config_from_args(parser.parse_args(argv[2:])) == cfg
    assert cfg.command(world_size=2).startswith("torchrun --nproc_per_node=2 -m coopnets.train ")
    assert "--resume" not in dataclasses.replace(cfg, resume=True).command()


def test_deployable_checkpoint_records_how_it_was_made(tmp_path):
    from coopnets.hub.manifest import checkpoint_record

    train(TrainConfig(out=str(tmp_path / "run"), method="multi_exit", epochs=1, **TINY), echo=False)
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    training = config["coopnets"]["training"]
    assert training["command"].startswith("coopnets train --out ") and "--method multi_exit" in training["command"]
    # a real run's checkpoint is complete enough for the zoo manifest (hub/publish.py)
    record = checkpoint_record(config, config["architecture"], "digits", "org/x@abc")
    assert record["training"]["seed"] == 3 and len(record["per_depth"]) == 4
