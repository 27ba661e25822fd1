"""Training data (issue 3): the embedded digits splits and ImageFolder trees with clear errors."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch
from PIL import Image

from coopnets.train.data import DataError, digits_splits, folder_splits, load_data


def _labels(ds) -> Counter:
    return Counter(int(y) for _, y in ds)


def test_digits_split_sizes_stratified_and_deterministic():
    a, b = digits_splits(img_size=16), digits_splits(img_size=16)
    assert (len(a.train), len(a.val), len(a.test)) == (1077, 360, 360)
    for split in ("train", "val", "test"):
        x1, x2 = getattr(a, split).tensors[0], getattr(b, split).tensors[0]
        assert torch.equal(x1, x2), f"{split} split changed between two loads"
    total = Counter(_labels(a.train)) + _labels(a.val) + _labels(a.test)
    for split, n in (("train", 1077), ("val", 360), ("test", 360)):
        counts = _labels(getattr(a, split))
        for cls, c in total.items():  # every class within 1.5 images of its share of the split
            assert abs(counts[cls] - c * n / 1797) <= 1.5, (split, cls, counts[cls])


def test_digits_splits_are_disjoint_and_normalised():
    s = digits_splits(img_size=8)
    keys = {split: {t.numpy().tobytes() for t in getattr(s, split).tensors[0]} for split in ("train", "val", "test")}
    # digits holds a few exact duplicate images; a leak would share far more than a handful
    assert len(keys["train"] & keys["test"]) <= 3 and len(keys["val"] & keys["test"]) <= 3
    x = s.train.tensors[0]
    assert x.shape[1:] == (3, 8, 8) and torch.equal(x[:, 0], x[:, 2])
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3


def test_digits_split_seed_changes_the_split():
    assert not torch.equal(digits_splits(8, split_seed=0).test.tensors[1], digits_splits(8, split_seed=1).test.tensors[1])


def _tree(root: Path, layout: Dict[str, Dict[str, int]]) -> Path:
    rng = np.random.default_rng(0)
    for split, classes in layout.items():
        for cls, n in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def test_image_folder_loads_through_timm(tmp_path):
    root = _tree(tmp_path, {"train": {"cat": 3, "dog": 2}, "val": {"cat": 1, "dog": 1}})
    s = load_data(data_dir=str(root), img_size=16)
    assert s.num_classes == 2 and s.class_names == ["cat", "dog"]
    assert (len(s.train), len(s.val)) == (5, 2) and s.test is s.val
    x, y = s.val[1]
    assert tuple(x.shape) == (3, 16, 16) and y == 1


@pytest.mark.parametrize("layout, message", [
    (None, "does not exist"),
    ({"train": {"a": 1}}, "Missing split folder"),
    ({"train": {"a": 1, "b": 1}, "val": {"a": 1, "c": 1}}, "Class folders differ"),
    ({"train": {"a": 0}, "val": {"a": 1}}, "has no images"),
])
def test_image_folder_errors_are_clear(tmp_path, layout, message):
    root = tmp_path / "missing" if layout is None else _tree(tmp_path, layout)
    with pytest.raises(DataError, match=message):
        folder_splits(str(root), img_size=16)


def test_unknown_dataset_lists_the_options():
    with pytest.raises(DataError, match="use 'digits' or --data-dir"):
        load_data("cifar10")
