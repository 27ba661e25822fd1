"""What serving trades depths by: recorded validation accuracies first, calibration data from folders and runs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import pytest
import timm.data
import torch
from PIL import Image

import coopnets
from coopnets.serving import DepthController, load_calibration, recorded_accuracies
from coopnets.serving.calibration import SOURCE_TEST, SOURCE_TRAINING_VAL, SOURCE_VAL
from coopnets.train import TrainConfig, Trainer, load_data

TEST_ACC = [0.5, 0.62, 0.7, 0.81]
VAL_ACC = [0.48, 0.6, 0.72, 0.8]
SIZE = (3, 32, 32)
TINY = dict(model="test_resnet", img_size=16, limit_train=64, limit_eval=32, batch_size=32, epochs=1,
            progress=False, profile_repeats=1, seed=3)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here on one intra-op thread (``one_torch_thread`` in conftest.py)."""


def small_model(num_classes: int = 10, label_names: List[str] = ()) -> coopnets.DepthAdaptiveModel:
    torch.manual_seed(0)
    m = coopnets.wrap("test_resnet", num_classes=num_classes).eval()
    m.pretrained_cfg["input_size"] = SIZE
    if label_names:
        m.pretrained_cfg["label_names"] = list(label_names)
    return m


# --- recorded accuracies: validation first -----------------------------------------------------
def checkpoint(tmp_path: Path, edit=None, with_val: bool = True, training: Dict = None) -> coopnets.DepthAdaptiveModel:
    """A saved test_resnet checkpoint whose config.json ``edit(config)`` changed, loaded back."""
    rows = [{"depth": d, "accuracy": a, "batch_size": 1, "device": "cpu", **({"val_accuracy": v} if with_val else {})}
            for d, (a, v) in enumerate(zip(TEST_ACC, VAL_ACC), 1)]
    folder = coopnets.save_pretrained(small_model(), tmp_path / "ckpt", per_depth=rows, training=training)
    if edit is not None:
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning):  # no recorded data config: the loader says timm's defaults apply
        return coopnets.create_model(f"local-dir:{folder}", pretrained=True)


def test_per_depth_val_accuracy_comes_first(tmp_path):
    training = {"deployable": "net", "val_accuracy": {"net": [0.1, 0.2, 0.3, 0.4]}}
    rec = recorded_accuracies(checkpoint(tmp_path, training=training))
    assert (rec.values, rec.source, rec.warning) == (VAL_ACC, SOURCE_VAL, None)
    assert rec.source == "val_accuracy"


@pytest.mark.parametrize("deployable", ["net", "net_ema"])
def test_the_training_records_val_accuracy_of_the_deployable_net_next(tmp_path, deployable):
    """Checkpoints of older coopnets: per_depth has test accuracy only, training.val_accuracy every net's."""
    training = {"deployable": deployable, "val_accuracy": {"other": [0.9] * 4, deployable: [0.3, 0.4, 0.5, 0.6]}}
    rec = recorded_accuracies(checkpoint(tmp_path, with_val=False, training=training))
    assert (rec.values, rec.source, rec.warning) == ([0.3, 0.4, 0.5, 0.6], SOURCE_TRAINING_VAL, None)


def test_partial_val_column_falls_back_to_the_training_record(tmp_path):
    def drop_depth3_val(config):
        del config["coopnets"]["per_depth"][2]["val_accuracy"]

    training = {"deployable": "net", "val_accuracy": {"net": [0.3, 0.4, 0.5, 0.6]}}
    rec = recorded_accuracies(checkpoint(tmp_path, drop_depth3_val, training=training))
    assert rec.source == SOURCE_TRAINING_VAL and rec.values == [0.3, 0.4, 0.5, 0.6]


def test_test_accuracies_only_as_a_last_resort_with_a_warning(tmp_path):
    model = checkpoint(tmp_path, with_val=False, training={"deployable": "net", "val_accuracy": {"leader": [0.9]}})
    rec = recorded_accuracies(model)
    assert (rec.values, rec.source) == (TEST_ACC, SOURCE_TEST)
    assert "TEST accuracies" in rec.warning and "calibration" in rec.warning and "\n" not in rec.warning
    with pytest.warns(UserWarning, match="TEST accuracies"):  # the controller says so when it uses them
        ctl = DepthController.for_model(model, slo_ms=50.0, input_size=SIZE, max_batch_size=2, repeats=1)
    assert [o.accuracy for o in ctl.options] == TEST_ACC


def test_controller_trades_depths_by_the_validation_accuracies(tmp_path):
    ctl = DepthController.for_model(checkpoint(tmp_path), slo_ms=50.0, input_size=SIZE, max_batch_size=2, repeats=1)
    assert [(o.name, o.accuracy) for o in ctl.options] == [(f"depth{d}", a) for d, a in enumerate(VAL_ACC, 1)]


def test_no_complete_table_asks_for_accuracies(tmp_path):
    def keep_two_depths(config):
        config["coopnets"]["per_depth"] = config["coopnets"]["per_depth"][:2]

    with pytest.raises(ValueError, match=r"no val_accuracy for depth\(s\) \[3, 4\].*no accuracy for depth\(s\) "
                                         r"\[3, 4\].*accuracies="):
        recorded_accuracies(checkpoint(tmp_path, keep_two_depths))
    with pytest.raises(ValueError, match="not loaded from a coopnets checkpoint.*accuracies="):
        recorded_accuracies(small_model())


def test_val_accuracy_rows_are_checked_on_save(tmp_path):
    with pytest.raises(ValueError, match=r"val_accuracy must be a number in \[0, 1\].*got 88"):
        coopnets.save_pretrained(small_model(), tmp_path / "c", per_depth=[{"depth": 1, "val_accuracy": 88}])
    folder = coopnets.save_pretrained(small_model(), tmp_path / "t",
                                      per_depth=[{"depth": 1, "accuracy": 0.5, "val_accuracy": torch.tensor(0.25)}])
    assert json.loads((folder / "config.json").read_text())["coopnets"]["per_depth"][0]["val_accuracy"] == 0.25


# --- ImageFolder calibration --------------------------------------------------------------------
def image_folder(root: Path, classes: Dict[str, int], mode: str = "RGB") -> Path:
    """``root/<class>/<i>.png``: ``classes[name]`` images per class, each a flat colour of its own."""
    for c, (name, n) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new(mode, (20 + i, 18), (30 * c + 5 * i) % 256 if mode == "L" else (40 * c, 10 * i, 90)).save(
                root / name / f"{i}.png")
    return root


def server_transform(model):
    return timm.data.create_transform(**timm.data.resolve_data_config(model=model))


def test_image_folder_labels_by_label_names_and_preprocessing_as_the_server(tmp_path):
    root = image_folder(tmp_path / "cal", {"cat": 2, "dog": 3}, mode="L")
    model = small_model(3, ["bird", "cat", "dog"])
    batches = load_calibration(root, model, batch_size=2)
    assert [len(y) for _, y in batches] == [2, 2, 1]
    assert torch.cat([y for _, y in batches]).tolist() == [1, 1, 2, 2, 2]
    x = torch.cat([x for x, _ in batches])
    transform = server_transform(model)
    paths = [root / "cat" / "0.png", root / "cat" / "1.png", root / "dog" / "0.png", root / "dog" / "1.png",
             root / "dog" / "2.png"]
    expected = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    assert x.shape == (5, *SIZE) and torch.equal(x, expected)


def test_image_folder_labels_by_position_in_timms_order(tmp_path):
    root = image_folder(tmp_path / "cal", {"10": 1, "2": 2, "a": 1})
    labels = torch.cat([y for _, y in load_calibration(root, small_model(3))]).tolist()
    assert labels == [0, 0, 1, 2]  # natural order, as `coopnets train --data-dir` numbers classes: 2, 10, a
    # label names that none of the folders are named by: by position too
    assert torch.cat([y for _, y in load_calibration(root, small_model(3, ["x", "y", "z"]))]).tolist() == labels
    with pytest.raises(ValueError, match="3 classes but the model has 2"):
        load_calibration(root, small_model(2))


def test_seeded_subsample_of_max_items(tmp_path):
    root = image_folder(tmp_path / "cal", {"a": 6, "b": 6})
    first = load_calibration(root, small_model(2), max_items=5, batch_size=3)
    again = load_calibration(root, small_model(2), max_items=5, batch_size=3)
    assert [len(y) for _, y in first] == [3, 2]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    other = load_calibration(root, small_model(2), max_items=5, batch_size=3, seed=1)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))


def test_bad_sources_are_refused_in_one_line(tmp_path):
    model = small_model(3, ["bird", "cat", "dog"])
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    broken = image_folder(tmp_path / "broken", {"cat": 1})
    (broken / "cat" / "bad.png").write_bytes(b"not a png")
    stray = image_folder(tmp_path / "stray", {"cat": 1})
    Image.new("RGB", (4, 4)).save(stray / "loose.png")
    splits = tmp_path / "splits"
    image_folder(splits / "train", {"cat": 1}), image_folder(splits / "val", {"cat": 1})
    typo = image_folder(tmp_path / "typo", {"cat": 1, "dgo": 1})
    ckpt = coopnets.save_pretrained(model, tmp_path / "run" / "model")
    cases = [
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "file.txt", "is a file, not a folder"),
        (tmp_path / "empty", "its 1 class subfolders hold no PNG or JPEG images"),
        (broken, "cannot read the image .*bad.png"),
        (stray, r"images outside class subfolders \(loose.png\)"),
        (splits, r"dataset root with split folders \(train, val\).*validation split folder \(.*val\)"),
        (typo, r"class folders \['dgo'\] are not among the model's label names"),
        (ckpt, "is a checkpoint folder, which holds no data; give the run folder"),
    ]
    for path, problem in cases:
        with pytest.raises(ValueError, match=problem) as err:
            load_calibration(path, model)
        message = str(err.value)
        assert message.startswith(f"calibration {path}: ") and "\n" not in message, message
        assert "an ImageFolder" in message and "training run folder" in message
    with pytest.raises(ValueError, match="max_items 0: must be an integer >= 1"):
        load_calibration(broken, model, max_items=0)


# --- run folders: their validation split ---------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("calibration") / "run"
    torch.set_num_threads(1)
    summary = Trainer(TrainConfig(out=str(run), method="multi_exit", **TINY), echo=False).fit()
    return run, summary


def test_training_records_val_accuracy_per_depth(tiny_run):
    run, summary = tiny_run
    coop = json.loads((run / "model" / "config.json").read_text())["coopnets"]
    val = summary["val_accuracy"][summary["deployable"]]
    assert [r["val_accuracy"] for r in coop["per_depth"]] == val
    assert [r["accuracy"] for r in coop["per_depth"]] == summary["test_accuracy"]
    assert "| depth | accuracy | val_accuracy |" in (run / "results.md").read_text()
    assert "| Depth | Top-1 accuracy | Validation accuracy |" in (run / "model" / "README.md").read_text()
    rec = recorded_accuracies(coopnets.create_model(f"local-dir:{run / 'model'}", pretrained=True))
    assert (rec.values, rec.source, rec.warning) == (val, SOURCE_VAL, None)


def test_run_folder_gives_its_validation_split_as_the_server_sees_it(tiny_run):
    run, _ = tiny_run
    model = coopnets.create_model(f"local-dir:{run / 'model'}", pretrained=True).eval()
    batches = load_calibration(run, model, batch_size=10)
    assert [len(y) for _, y in batches] == [10, 10, 10, 2]  # limit_eval=32 of the run
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    splits = load_data("digits", img_size=16).limited(TINY["limit_train"], TINY["limit_eval"])
    val_x = torch.stack([s[0] for s in splits.val])
    val_y = torch.stack([s[1] for s in splits.val])
    test_y = torch.stack([s[1] for s in splits.test])
    assert torch.equal(y, val_y) and not torch.equal(y, test_y)
    # the server's transform of the digit as an 8-bit RGB image: the run's val tensors up to 8-bit rounding
    torch.testing.assert_close(x, val_x, atol=0.02, rtol=0)
    assert len(load_calibration(run, model, max_items=7)[0][1]) == 7

    ctl = DepthController.for_model(model, slo_ms=1e4, calibration=batches, early_exit=True, max_batch_size=4,
                                    profile_batch_sizes=[1, 4], repeats=1)
    early = [o for o in ctl.options if o.early_exit]
    assert early and all(o.name.startswith("early_exit@") and len(o.thresholds) == model.num_depths - 1 for o in early)
    assert [o.name for o in ctl.options][:4] == ["depth1", "depth2", "depth3", "depth4"]


def test_run_folder_with_an_image_folder_reads_its_val_split_never_test(tiny_run, tmp_path):
    run, _ = tiny_run
    data = tmp_path / "data"
    for split, n in (("train", 1), ("val", 2), ("test", 3)):
        image_folder(data / split, {"0": n, "1": n})
    saved = json.loads((run / "config.json").read_text())
    fake = tmp_path / "folder_run"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps({**saved, "data_dir": str(data), "limit_eval": None}))
    model = coopnets.create_model(f"local-dir:{run / 'model'}", pretrained=True).eval()
    batches = load_calibration(fake, model)
    x, y = batches[0]
    assert y.tolist() == [0, 0, 1, 1]
    transform = server_transform(model)
    expected = [transform(Image.open(data / "val" / c / f"{i}.png").convert("RGB")) for c in "01" for i in range(2)]
    assert torch.equal(x, torch.stack(expected))

    (fake / "config.json").write_text(json.dumps({**saved, "data_dir": str(tmp_path / "gone")}))
    with pytest.raises(ValueError, match=r"validation split cannot be rebuilt from its data \(--data-dir .*gone"):
        load_calibration(fake, model)
    (fake / "config.json").write_text(json.dumps({**saved, "dataset": "mnist"}))
    with pytest.raises(ValueError, match=r"cannot be rebuilt .*--dataset mnist: Unknown dataset 'mnist'"):
        load_calibration(fake, model)
