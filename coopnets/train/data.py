"""Training data: the embedded ``digits`` set and ImageFolder trees, as train/val/test splits.

``digits`` (default, no download)
    scikit-learn's ``load_digits``: 1,797 grey 8x8 images of 10 classes. A fixed seeded
    stratified split (60 / 20 / 20 % train / val / test, ``split_seed`` independent of the
    training seed so every run is scored on the same test images), bilinear resize to the
    model's input size, replicated to 3 channels, normalised with the train split's mean
    and std.

``--data-dir PATH`` (ImageFolder)
    ``PATH/train/<class>/*`` and ``PATH/val/<class>/*`` (plus an optional ``PATH/test``;
    without it the val split doubles as test split), read through timm's
    ``create_dataset`` with transforms from ``resolve_data_config`` /
    ``create_transform`` (training augmentation on train only). Missing folders, empty
    splits and splits whose classes differ raise a :class:`DataError` naming the problem.

Example:
    >>> splits = load_data("digits", img_size=16)
    >>> len(splits.train), len(splits.val), len(splits.test), splits.num_classes
    (1077, 360, 360, 10)
    >>> x, y = splits.train[0]
    >>> tuple(x.shape)
    (3, 16, 16)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

DATASETS = ("digits",)
DIGITS_SPLIT = (0.6, 0.2, 0.2)


class DataError(ValueError):
    """A dataset that cannot be used as given (bad path, empty split, class mismatch)."""


@dataclass
class DataSplits:
    """Train / val / test datasets of ``(image, label)`` pairs and what they describe.

    Attributes:
        train, val, test: the splits (``test`` is ``val`` for folders without ``test/``).
        num_classes: number of classes.
        class_names: class names, index order.
        input_size: ``(C, H, W)`` of every image tensor.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    class_names: List[str]
    input_size: Tuple[int, int, int]

    def limited(self, limit_train: Optional[int] = None, limit_eval: Optional[int] = None) -> "DataSplits":
        """The first ``limit_*`` samples of each split (for fast tests and smoke runs)."""

        def head(ds: Dataset, n: Optional[int]) -> Dataset:
            return ds if n is None or n >= len(ds) else Subset(ds, range(n))

        return DataSplits(
            head(self.train, limit_train), head(self.val, limit_eval), head(self.test, limit_eval),
            self.num_classes, self.class_names, self.input_size,
        )


def digits_splits(img_size: int = 32, split_seed: int = 0) -> DataSplits:
    """The embedded ``digits`` set as stratified train/val/test splits of ``(3, img_size, img_size)`` tensors.

    Example:
        >>> s = digits_splits(img_size=8)
        >>> sorted(set(int(y) for _, y in s.test)) == list(range(10))
        True
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx = list(range(len(y)))
    _, val_frac, test_frac = DIGITS_SPLIT
    rest, test_idx = train_test_split(idx, test_size=test_frac, stratify=y, random_state=split_seed)
    train_idx, val_idx = train_test_split(
        rest, test_size=val_frac / (1 - test_frac), stratify=y[rest], random_state=split_seed
    )
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    train_x = x[train_idx]
    mean, std = train_x.mean(), train_x.std()

    def split(ids: List[int]) -> TensorDataset:
        return TensorDataset((x[ids] - mean) / std, y[ids])

    return DataSplits(
        split(train_idx), split(val_idx), split(test_idx), 10, [str(i) for i in range(10)], (3, img_size, img_size)
    )


def _folder_split(root: Path, split: str, transform, required: bool = True):
    """One ImageFolder split through timm's dataset factory, checked for existence and content."""
    from timm.data import create_dataset

    path = root / split
    if not path.is_dir():
        if not required:
            return None
        raise DataError(f"Missing split folder {path}: --data-dir needs train/ and val/ subfolders of class folders.")
    try:
        ds = create_dataset("", root=str(path), split=split, search_split=False, is_training=split == "train")
    except Exception as e:  # timm raises a bare RuntimeError/FileNotFoundError for an empty tree
        raise DataError(f"Split folder {path} has no images usable as {path}/<class>/<image>: {e}") from e
    ds.transform = transform
    return ds


def _classes(ds) -> List[str]:
    mapping = ds.reader.class_to_idx
    return sorted(mapping, key=mapping.get)


def folder_splits(data_dir: str, img_size: int = 224, pretrained_cfg: Optional[Dict[str, Any]] = None) -> DataSplits:
    """ImageFolder splits from ``data_dir/{train,val[,test]}`` with timm's transforms.

    Normalisation and interpolation come from the model's ``pretrained_cfg`` when given
    (timm's ``resolve_data_config``), at input size ``img_size``.
    """
    from timm.data import create_transform, resolve_data_config

    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"--data-dir {root} does not exist or is not a directory.")
    cfg = resolve_data_config({"input_size": (3, img_size, img_size)}, pretrained_cfg=pretrained_cfg or {})
    train_tf = create_transform(**cfg, is_training=True)
    eval_tf = create_transform(**cfg, is_training=False)
    train = _folder_split(root, "train", train_tf)
    val = _folder_split(root, "val", eval_tf)
    test = _folder_split(root, "test", eval_tf, required=False) or val
    names = _classes(train)
    for split, ds in (("val", val), ("test", test)):
        if _classes(ds) != names:
            raise DataError(
                f"Class folders differ between train/ and {split}/ in {root}: "
                f"train has {names}, {split} has {_classes(ds)}."
            )
    return DataSplits(train, val, test, len(names), names, tuple(cfg["input_size"]))


def load_data(
    dataset: str = "digits",
    data_dir: Optional[str] = None,
    img_size: int = 32,
    pretrained_cfg: Optional[Dict[str, Any]] = None,
    split_seed: int = 0,
) -> DataSplits:
    """Dispatch: ``digits`` (embedded) unless ``data_dir`` is given (ImageFolder).

    Example:
        >>> load_data("mnist")
        Traceback (most recent call last):
        ...
        coopnets.train.data.DataError: Unknown dataset 'mnist'; use 'digits' or --data-dir PATH (ImageFolder).
    """
    if data_dir is not None:
        return folder_splits(data_dir, img_size=img_size, pretrained_cfg=pretrained_cfg)
    if dataset != "digits":
        raise DataError(f"Unknown dataset {dataset!r}; use 'digits' or --data-dir PATH (ImageFolder).")
    return digits_splits(img_size=img_size, split_seed=split_seed)
