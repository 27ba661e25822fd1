"""A careless user's bad inputs (issue 21): each row is one input, its expected exit, the words its
message must hold, and the promise that every file of the workspace (run folders, checkpoints, the
user's own folders) has the same hash before and after.

``CLI`` rows run ``coopnets ...`` in-process (``coopnets.cli.main``): exit code, stderr line count
(1 for a refusal, 2 for an argparse error: the usage line and the error) and key words, no traceback.
``API`` rows call the Python API: the exception type (or a returned value), key words, one line.
The tests after the table cover what a row cannot: two processes on one run folder, a lock left by a
killed process, a moved or relatively addressed run folder, the warnings of a run that completes,
``python -m coopnets.train``, ``hub/build_zoo.py`` and ``benchmarks/*``.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import runpy
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import pytest
import torch

import coopnets
from coopnets.cli import main
from coopnets.hub import CheckpointError
from coopnets.inference.export import save
from coopnets.train import TrainConfig, train
from coopnets.train.checks import check_config
from coopnets.train.folder import LOCK_NAME, RunFolderError, RunLock
from coopnets.train.state import CheckpointReadError, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ("--model test_resnet --method multi_exit --epochs 1 --img-size 16 --limit-train 64 --limit-eval 32 "
        "--batch-size 32 --no-progress --profile-repeats 1")
HAS_CUDA = torch.cuda.is_available()


class Hostile:
    """Unpickling this would create ``MARKER``: a raw-pickle ``last.pth`` must never run it."""

    marker: Optional[Path] = None

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def snapshot(root: Path) -> Dict[str, str]:
    """Every path under ``root``: sha256 of each file, ``dir`` for each folder (new or removed ones count)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def edit_config(folder: Path, edit: Callable[[Dict[str, Any]], Any]) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """The workspace: a finished run, checkpoints (good and damaged), the user's folders and files."""
    ws = tmp_path_factory.mktemp("ws")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", *shlex.split(TINY), "--out", str(ws / "run")]) == 0
    data = coopnets.train.load_data("digits", img_size=16).pretrained_cfg_fields()
    ckpt = coopnets.save_pretrained(coopnets.wrap("test_resnet", num_classes=10), ws / "ckpt", data_config=data)
    for name, edit in {
        "no_args": lambda c: c.pop("model_args"),
        "str_args": lambda c: c.update(model_args="plan=exits"),
        "ten": lambda c: c.update(num_classes="ten"),
        "bad_head": lambda c: c["model_args"].update(head=7),
        "unknown_backbone": lambda c: (c.update(architecture="coop_test_resnt"), c["coopnets"].update(backbone="test_resnt"),
                                       c["pretrained_cfg"].update(architecture="coop_test_resnt")),
    }.items():
        shutil.copytree(ckpt, ws / "bad" / name)
        edit_config(ws / "bad" / name, edit)
    shutil.copytree(ckpt, ws / "bad" / "not_json")
    (ws / "bad" / "not_json" / "config.json").write_text("{not json")
    (ws / "foreign").mkdir()
    (ws / "foreign" / "config.json").write_text('{"mine": 1}\n')
    (ws / "notes").mkdir()
    (ws / "notes" / "notes.txt").write_text("my notes\n")
    (ws / "existing_dir").mkdir()
    (ws / "empty").mkdir()
    (ws / "file.txt").write_text("a file\n")
    for name in ("run_pickle", "run_trunc"):
        shutil.copytree(ws / "run", ws / name)
    Hostile.marker = ws / "PWNED"
    torch.save({"recipe": Hostile()}, ws / "run_pickle" / "last.pth")
    last = ws / "run_trunc" / "last.pth"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    for name, text in {"ten": 'epochs: "ten"\n', "lr_list": "lr: [0.1, 0.2]\n", "seed": "seed: abc\n",
                       "unknown": "nope: 1\n", "list": "- 1\n- 2\n", "kwargs": "model_kwargs: [1, 2]\n"}.items():
        (ws / "yaml").mkdir(exist_ok=True)
        (ws / "yaml" / f"{name}.yaml").write_text(text)
    return ws


@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch) -> str:
    """huggingface_hub pointed at a closed port on 127.0.0.1 (its retries are kept, their sleeps skipped)."""
    from huggingface_hub import constants
    import huggingface_hub.utils._http as http

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(http, "time", types.SimpleNamespace(sleep=lambda s: None, time=time.time))
    return url


# --- the table: coopnets COMMAND ... --------------------------------------------------------------
# (id, argv ({ws}: the workspace, {T}: a tiny training run), exit code, stderr lines, key words)
CLI: Tuple[Tuple[str, str, int, int, Tuple[str, ...]], ...] = (
    # train: the run folder belongs to its run (issue items 1-4)
    ("train-foreign-config-json", "train {T} --out {ws}/foreign", 2, 1,
     ("--out", "foreign", "config.json", "not a coopnets run's")),
    ("train-folder-with-user-files", "train {T} --out {ws}/notes", 2, 1, ("notes.txt", "new or empty folder")),
    ("train-out-is-a-file", "train {T} --out {ws}/file.txt", 2, 1, ("file.txt", "is a file")),
    ("train-existing-run-without-resume", "train {T} --out {ws}/run", 2, 1, ("already holds a run", "--resume")),
    ("train-resume-with-other-settings", "train {T} --out {ws}/run --resume --lr 0.5", 2, 1,
     ("settings differ", "--lr 0.5", "--epochs")),
    ("train-resume-nothing-to-resume", "train {T} --out {ws}/empty --resume", 2, 1, ("no checkpoint", "last.pth")),
    ("train-resume-raw-pickle", "train {T} --out {ws}/run_pickle --resume", 2, 1,
     ("run_pickle/last.pth", "pickles Python objects", "never loads")),
    ("train-resume-truncated", "train {T} --out {ws}/run_trunc --resume", 2, 1, ("cannot read checkpoint", "truncated")),
    ("train-resume-while-another-run-holds-it", "train {T} --out {ws}/run --resume", 2, 1,
     ("in use by another coopnets run", "pid {pid}")),
    # train: devices (issue 5)
    ("train-device-cuda-without-gpu" if not HAS_CUDA else "train-device-missing-gpu",
     "train {T} --out {ws}/new --device " + ("cuda" if not HAS_CUDA else "cuda:99"), 2, 1,
     ("--device", "valid here: cpu")),
    ("train-device-tpu9", "train {T} --out {ws}/new --device tpu9", 2, 1, ("'tpu9'", "not a device", "cpu, cuda")),
    ("train-device-meta", "train {T} --out {ws}/new --device meta", 2, 1, ("'meta'", "cannot train on meta")),
    # train: values checked against their types and choices (issues 10-12)
    ("train-opt-unknown", "train {T} --out {ws}/new --opt bogusopt", 2, 1, ("--opt 'bogusopt'", "adamw", "sgd")),
    ("train-sched-unknown", "train {T} --out {ws}/new --sched bogussched", 2, 1,
     ("--sched 'bogussched'", "cosine", "step")),
    ("train-model-kwargs-wrong-type", "train {T} --out {ws}/new --model-kwargs drop_path_rate=lots", 2, 1,
     ("--model-kwargs", "drop_path_rate", "number", "'lots'")),
    ("train-model-kwargs-unknown", "train {T} --out {ws}/new --model-kwargs nosuch=1", 2, 1,
     ("no option 'nosuch'", "drop_path_rate")),
    ("train-model-kwargs-bad-head", "train {T} --out {ws}/new --model-kwargs head=round", 2, 1,
     ("head='round'", "linear, conv")),
    ("train-model-kwargs-other-plan", "train {T} --out {ws}/new --model-kwargs block_depths=[[1]]", 2, 1,
     ("block_depths", "plan='blocks'")),
    ("train-model-kwargs-not-key-value", "train {T} --out {ws}/new --model-kwargs junk", 2, 1,
     ("--model-kwargs", "key=value", "'junk'")),
    ("train-model-kwargs-on-a-checkpoint", "train {T} --out {ws}/new --model hf-hub:org/x --model-kwargs drop_rate=0.1",
     2, 1, ("--model-kwargs", "is a checkpoint")),
    ("train-recipe-opt-wrong-type", "train {T} --out {ws}/new --method cooperative --recipe-opt temperature=hot", 2, 1,
     ("--recipe-opt", "temperature", "number", "'hot'", "w_leader_kd")),
    ("train-recipe-opt-unknown", "train {T} --out {ws}/new --recipe-opt temperature=3", 2, 1,
     ("temperature", "MultiExitConfig", "exit_weights")),
    ("train-recipe-opt-fixed-leader-not-bool", "train {T} --out {ws}/new --method cooperative --recipe-opt fixed_leader=3",
     2, 1, ("fixed_leader", "True or False")),
    ("train-yaml-epochs-ten", "train {T} --out {ws}/new -c {ws}/yaml/ten.yaml", 2, 1,
     ("ten.yaml", "epochs", "int", "'ten'")),
    ("train-yaml-lr-list", "train {T} --out {ws}/new -c {ws}/yaml/lr_list.yaml", 2, 1,
     ("lr_list.yaml", "lr", "number", "[0.1, 0.2]")),
    ("train-yaml-seed-abc", "train {T} --out {ws}/new -c {ws}/yaml/seed.yaml", 2, 1, ("seed", "int", "'abc'")),
    ("train-yaml-unknown-key", "train {T} --out {ws}/new -c {ws}/yaml/unknown.yaml", 2, 1,
     ("unknown setting", "'nope'", "epochs")),
    ("train-yaml-not-a-mapping", "train {T} --out {ws}/new -c {ws}/yaml/list.yaml", 2, 1, ("expected a mapping",)),
    ("train-yaml-model-kwargs-list", "train {T} --out {ws}/new -c {ws}/yaml/kwargs.yaml", 2, 1,
     ("model_kwargs", "mapping")),
    ("train-yaml-missing-file", "train {T} --out {ws}/new -c {ws}/yaml/missing.yaml", 2, 1,
     ("missing.yaml", "cannot read")),
    ("train-model-unknown", "train {T} --out {ws}/new --model nonexistent_net", 2, 1,
     ("'nonexistent_net'", "coop_resnet18", "timm")),
    ("train-initial-checkpoint-missing", "train {T} --out {ws}/new --initial-checkpoint local-dir:/nonexistent", 2, 1,
     ("/nonexistent", "config.json not found")),
    ("train-data-dir-missing", "train {T} --out {ws}/new --data-dir {ws}/no_data", 2, 1, ("no_data", "does not exist")),
    ("train-epochs-zero", "train {T} --out {ws}/new --epochs 0", 2, 1, ("--epochs must be > 0 (got 0)",)),
    ("train-lr-negative", "train {T} --out {ws}/new --lr -1", 2, 1, ("--lr must be >= 0",)),
    ("train-batch-size-zero", "train {T} --out {ws}/new --batch-size 0", 2, 1, ("--batch-size must be > 0",)),
    ("train-num-classes-zero", "train {T} --out {ws}/new --num-classes 0", 2, 1, ("--num-classes must be > 0",)),
    ("train-mixup-odd-batch", "train {T} --out {ws}/new --mixup 0.2 --batch-size 3", 2, 1, ("even", "--mixup")),
    ("train-torchcompile-unknown-backend", "train {T} --out {ws}/new --torchcompile nosuch", 2, 1,
     ("--torchcompile", "inductor")),
    # train: argparse errors are two lines (issue 13)
    ("train-epochs-not-a-number", "train --epochs abc", 2, 2, ("usage: coopnets train", "invalid int value: 'abc'")),
    ("train-method-unknown", "train --method nope", 2, 2, ("invalid choice: 'nope'", "cooperative")),
    ("train-unknown-flag", "train --bogus-flag", 2, 2, ("unrecognized arguments: --bogus-flag",)),
    ("train-clip-mode-unknown", "train --clip-mode sideways", 2, 2, ("--clip-mode", "norm")),
    ("train-amp-dtype-unknown", "train --amp-dtype float8", 2, 2, ("--amp-dtype", "bfloat16")),
    ("train-plan-unknown", "train --plan zigzag", 2, 2, ("--plan", "exits")),
    # export (issues 6, 7, 15)
    ("export-onto-existing-dir-onnx", "export {ws}/ckpt --depth 2 --format onnx --out {ws}/existing_dir", 2, 1,
     ("--out", "existing_dir", "is a folder", "depth2.onnx")),
    ("export-onto-existing-dir-torchscript", "export {ws}/ckpt --depth 2 --format torchscript --out {ws}/existing_dir", 2, 1,
     ("is a folder", "depth2.pt")),
    ("export-onto-existing-dir-safetensors", "export {ws}/ckpt --depth 2 --format safetensors --out {ws}/existing_dir",
     2, 1, ("is a folder", "depth2.safetensors")),
    ("export-config-without-model-args", "export {ws}/bad/no_args --depth 2 --out {ws}/x.onnx", 2, 1,
     ("no_args", "model_args is missing")),
    ("export-config-model-args-a-string", "export {ws}/bad/str_args --depth 2 --out {ws}/x.onnx", 2, 1,
     ("model_args must be a JSON object", "'plan=exits'")),
    ("export-config-num-classes-ten", "export {ws}/bad/ten --depth 2 --out {ws}/x.onnx", 2, 1,
     ("num_classes must be an int >= 1 (got 'ten')",)),
    ("export-config-bad-head", "export {ws}/bad/bad_head --depth 2 --out {ws}/x.onnx", 2, 1,
     ("do not build a model", "head=7")),
    ("export-config-not-json", "export {ws}/bad/not_json --depth 2 --out {ws}/x.onnx", 2, 1, ("not valid JSON",)),
    ("export-bad-depth", "export {ws}/run --depth 9 --format torchscript --out {ws}/x.pt", 2, 1, ("1..4", "got 9")),
    ("export-source-missing", "export {ws}/nope --depth 2 --out {ws}/x.onnx", 2, 1, ("does not exist", "run folder")),
    ("export-source-a-file", "export {ws}/file.txt --depth 2 --out {ws}/x.onnx", 2, 1, ("is a file, not a checkpoint",)),
    ("export-source-empty-dir", "export {ws}/empty --depth 2 --out {ws}/x.onnx", 2, 1, ("no checkpoint in",)),
    ("export-unknown-name", "export coop_nonet --depth 2 --out {ws}/x.onnx", 2, 1, ("unknown model 'coop_nonet'",)),
    ("export-wrapped-backbone-timm-lacks", "export {ws}/bad/unknown_backbone --depth 2 --out {ws}/x.onnx", 2, 1,
     ("Unknown timm backbone 'test_resnt'", "coop_test_resnt", "timm 1.", "Did you mean: test_resnet")),
    ("export-img-size-zero", "export {ws}/ckpt --depth 2 --img-size 0 --out {ws}/x.onnx", 2, 1, ("--img-size 0", ">= 1")),
    ("export-hub-unreachable", "export hf-hub:org/x --depth 2 --format torchscript --out {ws}/x.pt", 2, 1,
     ("hf-hub:org/x", "could not be reached", "127.0.0.1", "Connection refused")),
    ("export-format-unknown", "export {ws}/ckpt --depth 2 --format tflite --out {ws}/x", 2, 2,
     ("invalid choice: 'tflite'", "onnx")),
    ("export-depth-not-a-number", "export {ws}/ckpt --depth two --out {ws}/x.onnx", 2, 2, ("invalid int value: 'two'",)),
    ("export-no-arguments", "export", 2, 2, ("usage: coopnets export", "required")),
    # push (issue 8)
    ("push-hub-unreachable", "push {ws}/ckpt --repo-id org/x", 2, 1, ("cannot be reached", "127.0.0.1", "HF_ENDPOINT")),
    ("push-run-folder-hub-unreachable", "push {ws}/run --repo-id org/x", 2, 1, ("cannot be reached",)),
    ("push-source-missing", "push {ws}/nope --repo-id org/x", 2, 1, ("does not exist",)),
    ("push-empty-folder", "push {ws}/empty --repo-id org/x", 2, 1, ("no checkpoint in",)),
    ("push-a-file", "push {ws}/file.txt --repo-id org/x", 2, 1, ("is a file",)),
    ("push-without-repo-id", "push {ws}/ckpt", 2, 2, ("--repo-id", "required")),
    ("push-create-pr-to-a-branch", "push {ws}/ckpt --repo-id org/x --create-pr --revision dev", 2, 1,
     ("--revision dev", "--create-pr opens a pull request against the default branch", "drop --revision")),
    # demo (issues 9, 18)
    ("demo-negative-input-size", "demo --model coop_resnet18 --input-size 3 -4 32", 2, 1,
     ("--input-size 3 -4 32", ">= 1")),
    ("demo-batch-size-zero", "demo --model coop_resnet18 --batch-size 0", 2, 1, ("--batch-size 0", ">= 1")),
    ("demo-repeats-zero", "demo --model coop_resnet18 --repeats 0", 2, 1, ("--repeats 0", ">= 1")),
    ("demo-num-classes-zero", "demo --model coop_resnet18 --num-classes 0", 2, 1, ("--num-classes 0",)),
    ("demo-wrong-channels", "demo --model coop_resnet18 --input-size 4 32 32 --repeats 1", 2, 1,
     ("(N, 3, H, W)", "(1, 4, 32, 32)")),
    ("demo-unknown-model", "demo --model coop_nonet", 2, 1, ("Unknown coopnets model 'coop_nonet'", "coop_resnet18")),
    ("demo-input-size-two-numbers", "demo --input-size 3 32", 2, 2, ("--input-size", "expected 3 arguments")),
    # serve: refused before Ray starts
    ("serve-slo-negative", "serve {ws}/ckpt --slo-ms -5", 2, 1, ("--slo-ms", "-5", "> 0")),
    ("serve-port-zero", "serve {ws}/ckpt --port 0", 2, 1, ("--port 0", "1..65535")),
    ("serve-max-batch-size-zero", "serve {ws}/ckpt --max-batch-size 0", 2, 1, ("--max-batch-size 0", ">= 1")),
    ("serve-num-replicas-lots", "serve {ws}/ckpt --num-replicas lots", 2, 1, ("--num-replicas lots", "'auto'")),
    ("serve-port-not-a-number", "serve {ws}/ckpt --port http", 2, 2, ("invalid int value: 'http'",)),
    # the command itself
    ("no-command", "", 2, 2, ("usage: coopnets", "required")),
    ("unknown-command", "fly", 2, 2, ("invalid choice: 'fly'", "train")),
)


@contextlib.contextmanager
def held(folder: Optional[Path]) -> Iterator[None]:
    """``folder``'s run lock held by another owner (this process, through another descriptor) meanwhile."""
    if folder is None:
        yield
        return
    lock = RunLock.acquire(folder)
    try:
        yield
    finally:
        lock.release()


@pytest.mark.parametrize("case", CLI, ids=[c[0] for c in CLI])
def test_cli_bad_input(case, ws, unreachable_hub, capsys):
    name, argv, code, lines, words = case
    if name.startswith("serve-"):
        pytest.importorskip("coopnets.cli.serve")
    holder = ws / "run" if "another-run-holds-it" in name else None
    with held(holder):
        before = snapshot(ws)
        assert main(shlex.split(argv.format(ws=ws, T=TINY))) == code
        err = capsys.readouterr().err
        after = snapshot(ws)
    got = err.strip().splitlines()
    assert len(got) == lines, err
    assert "Traceback" not in err and got[-1].startswith(("coopnets", "usage: coopnets")), err
    for word in words:
        assert word.format(pid=os.getpid()) in err, (word, err)
    if "raw-pickle" in name:
        assert "weights_only=False" not in err and not (ws / "PWNED").exists()  # neither advised nor run
    assert after == before


# --- the table: the Python API -------------------------------------------------------------------
def _net() -> coopnets.DepthAdaptiveModel:
    torch.manual_seed(0)
    return coopnets.wrap("test_resnet", num_classes=3).eval()


def _train_mode_early_exit(ws: Path) -> Any:
    net = _net()
    early_exit = coopnets.EarlyExit(net)
    net.train()
    return early_exit(torch.randn(2, 3, 32, 32))


def _raw_pixels(ws: Path) -> Any:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        coopnets.EarlyExit(_net())(torch.rand(2, 3, 32, 32) * 255)
    return " ".join(str(w.message) for w in caught if issubclass(w.category, UserWarning))


# (id, call(ws), expected exception (None: returns), key words of the message (or of the returned value))
API: Tuple[Tuple[str, Callable[[Path], Any], Optional[type], Tuple[str, ...]], ...] = (
    ("api-early-exit-empty-batch", lambda ws: (lambda r: (tuple(r.logits.shape), r.flops_saving, r.total_flops))(
        coopnets.EarlyExit(_net())(torch.randn(0, 3, 32, 32))), None, ("(0, 3)", "1.0", " 0)")),
    ("api-early-exit-threshold-string", lambda ws: coopnets.EarlyExit(_net(), threshold="0.5"), ValueError,
     ("'0.5'", "number, not a string")),
    ("api-early-exit-train-mode", _train_mode_early_exit, ValueError, ("eval mode", "model.eval()")),
    ("api-early-exit-uint8", lambda ws: coopnets.EarlyExit(_net())(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)),
     ValueError, ("torch.uint8", "float images", "normalise")),
    ("api-early-exit-raw-pixels-warns", _raw_pixels, None, ("reaches 25", "normalised images")),
    ("api-config-epochs-ten", lambda ws: TrainConfig(epochs="ten").check(), ValueError, ("--epochs", "int", "'ten'")),
    ("api-config-device-tpu9", lambda ws: check_config(TrainConfig(device="tpu9")), ValueError, ("tpu9", "cpu")),
    ("api-config-opt-unknown", lambda ws: check_config(TrainConfig(opt="bogusopt")), ValueError, ("bogusopt", "adamw")),
    ("api-config-recipe-opt-type", lambda ws: check_config(TrainConfig(recipe_opts={"temperature": "hot"})), ValueError,
     ("temperature", "number")),
    ("api-train-into-foreign-folder", lambda ws: train(TrainConfig(out=str(ws / "foreign"), model="test_resnet")),
     RunFolderError, ("foreign", "config.json")),
    ("api-load-damaged-config", lambda ws: coopnets.create_model(f"local-dir:{ws / 'bad' / 'ten'}", pretrained=True),
     CheckpointError, ("num_classes", "'ten'")),
    ("api-export-save-onto-dir", lambda ws: save(_net().export(2), ws / "existing_dir", "onnx", torch.randn(1, 3, 32, 32)),
     IsADirectoryError, ("existing_dir", "is a folder")),
    ("api-load-raw-pickle-checkpoint", lambda ws: load_checkpoint(ws / "run_pickle" / "last.pth"), CheckpointReadError,
     ("pickles Python objects",)),
    ("api-early-exit-patience-float", lambda ws: coopnets.EarlyExit(_net(), "patience", 1.5), ValueError, ("int >= 1",)),
)


@pytest.mark.parametrize("case", API, ids=[c[0] for c in API])
def test_api_bad_input(case, ws):
    name, call, error, words = case
    before = snapshot(ws)
    if error is None:
        text = str(call(ws))
    else:
        with pytest.raises(error) as info:
            call(ws)
        text = str(info.value)
        assert "\n" not in text.strip(), text
    for word in words:
        assert word in text, (word, text)
    assert snapshot(ws) == before


def test_the_table_has_at_least_60_cases():
    assert len(CLI) + len(API) >= 60


# --- what a row cannot show ------------------------------------------------------------------------
LOCK_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"pid {os.getpid()} on test since now".encode())
print("locked", flush=True)
time.sleep(600)
"""


def test_a_lock_held_by_another_process_refuses_and_a_killed_holder_does_not_block(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out / LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=f"in use by another coopnets run \\(pid {holder.pid} "):
            RunLock.acquire(out)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / LOCK_NAME).exists()  # left behind by the killed process...
    lock = RunLock.acquire(out)  # ...and it does not block
    lock.release()
    assert not (out / LOCK_NAME).exists()


def test_a_second_writer_is_refused_at_once_naming_the_first_and_resume_after_a_kill(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "coopnets.cli", "train", *shlex.split(TINY), "--epochs", "1000", "--limit-train", "32",
           "--out", str(out)]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.time() + 300
        while not (out / "last.pth").exists():  # the first run is training and has a checkpoint
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else "timeout"
            time.sleep(0.5)
        for extra in ([], ["--resume"]):  # a second writer, and a resume, from another process (this one)
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                assert main(cmd[3:] + extra) == 2 and first.poll() is None
            lines = err.getvalue().strip().splitlines()
            assert len(lines) == 1 and f"in use by another coopnets run (pid {first.pid} " in lines[0], lines
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    epoch = load_checkpoint(out / "last.pth")["epoch"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics][:epoch] == list(range(1, epoch + 1))  # no epoch logged twice
    with contextlib.redirect_stdout(io.StringIO()):  # the killed run's lock does not block its resume
        assert main(["train", *shlex.split(TINY), "--limit-train", "32", "--epochs", str(epoch + 1), "--out", str(out),
                     "--resume"]) == 0
    assert not (out / LOCK_NAME).exists()


def test_resume_identifies_the_run_by_its_folder(ws, tmp_path, monkeypatch, capsys):
    moved = tmp_path / "elsewhere" / "moved"
    shutil.copytree(ws / "run", moved)  # a copied (or moved) run folder, resumed by a relative path
    monkeypatch.chdir(moved.parent)
    assert main(["train", *shlex.split(TINY), "--out", "moved", "--resume", "--epochs", "2"]) == 0
    config = json.loads((moved / "config.json").read_text())
    assert Path(config["out"]).resolve() == moved.resolve() and config["epochs"] == 2  # where it now lives
    assert load_checkpoint(moved / "last.pth")["epoch"] == 2
    monkeypatch.chdir(moved)  # the same folder, named relatively: "." and its absolute path are one run
    assert main(["train", *shlex.split(TINY), "--out", ".", "--resume", "--epochs", "2"]) == 0
    assert "settings differ" not in capsys.readouterr().err


def test_warnings_where_a_result_would_mislead(tmp_path, capsys):
    from PIL import Image

    for split in ("train", "val"):
        (tmp_path / "data" / split / "cat").mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(tmp_path / "data" / split / "cat" / f"{i}.png")
    argv = ["train", *shlex.split(TINY), "--data-dir", str(tmp_path / "data"), "--amp-dtype", "float16", "--device", "cpu",
            "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2, lines
    assert "coopnets train: warning: --amp-dtype float16 runs on CUDA only" in lines[0] and "float32" in lines[0]
    assert "coopnets train: warning: the train split holds one class (cat)" in lines[1]


def test_python_m_coopnets_train_follows_the_same_policy(tmp_path):
    result = subprocess.run([sys.executable, "-m", "coopnets.train", "--initial-checkpoint", "local-dir:/nonexistent",
                             "--out", str(tmp_path / "x")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("python -m coopnets.train: error: local-dir:/nonexistent") and not (tmp_path / "x").exists()


def test_python_m_coopnets_train_argparse_and_checks_in_process(tmp_path, capsys):
    from coopnets.cli.train import main as train_main

    assert train_main(["--epochs", "abc"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[0].startswith("usage: python -m coopnets.train [options]")
    assert train_main(["--device", "tpu9", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "x").exists()


def test_build_zoo_routes_every_error_through_the_one_policy(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_zoo_bad_inputs", ROOT / "hub" / "build_zoo.py")
    build_zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_zoo)
    base = ["coop_resnet18", "--from", "resnet18.a1_in1k", "--dry-run", "--out", str(tmp_path / "z")]
    assert build_zoo.main([*base, "--", "--device", "tpu9"]) == 2  # a train setting, refused before training
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("build_zoo: error: ") and "tpu9" in err[0]
    assert build_zoo.main([*base, "--", "--epochs", "abc"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2
    assert build_zoo.main(["coop_nonet", "--from", "x", "--out", str(tmp_path / "z")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "z").exists()


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")
                                          if p.name != "harness.py" and "__main__" in p.read_text()))
def test_every_benchmark_main_goes_through_the_policy(script, monkeypatch, capsys):
    source = (ROOT / "benchmarks" / script).read_text()
    if "run_entry(" not in source:
        pytest.skip(f"{script} is not routed yet (not this issue's file)")
    monkeypatch.setattr(sys, "argv", [script, "--no-such-flag"])
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(ROOT / "benchmarks" / script), run_name="__main__")
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 2 and err[0].startswith(f"usage: {script} [options]"), err
    assert err[1].startswith(f"{script}: error: "), err


def test_unexpected_failures_keep_their_traceback(monkeypatch):
    from coopnets.cli import errors

    def buggy():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        errors.run_entry(buggy, prog="x")
    monkeypatch.setenv("COOPNETS_TRACEBACK", "1")
    with pytest.raises(ValueError):
        errors.run_entry(lambda: (_ for _ in ()).throw(ValueError("expected, shown in full")), prog="x")
