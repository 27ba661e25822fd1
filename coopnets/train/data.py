"""Training data: the embedded ``digits`` set and ImageFolder trees, as train/val/test splits.

``digits`` (default, no download)
    scikit-learn's ``load_digits``: 1,797 grey 8x8 images of 10 classes. A fixed seeded
    stratified split (60 / 20 / 20 % train / val / test, ``split_seed`` independent of the
    training seed so every run is scored on the same test images), bilinear resize to the
    model's input size, replicated to 3 channels, normalised with the train split's mean
    and std. :meth:`DataSplits.pretrained_cfg_fields` records this as a timm data config:
    an 8x8 digit ``d`` (values 0..16) fed as the RGB image
    ``Image.fromarray((d * 255 / 16).astype("uint8")).convert("RGB")`` through
    ``timm.data.create_transform(**cfg)`` gives the training tensors (up to 8-bit rounding).

``--data-dir PATH`` (ImageFolder)
    ``PATH/train/<class>/*`` and ``PATH/val/<class>/*`` (plus an optional ``PATH/test``;
    without it the val split doubles as test split), read through timm's
    ``create_dataset`` with transforms from ``resolve_data_config`` /
    ``create_transform`` (training augmentation on train only; the val/test transform is
    ``create_transform(**splits.data_config, is_training=False)``, so a checkpoint's
    recorded config reproduces it by construction). Missing folders, empty splits and
    splits whose classes differ raise a :class:`DataError` naming the problem.

Example:
    >>> splits = load_data("digits", img_size=16)
    >>> len(splits.train), len(splits.val), len(splits.test), splits.num_classes
    (1077, 360, 360, 10)
    >>> x, y = splits.train[0]
    >>> tuple(x.shape)
    (3, 16, 16)
    >>> cfg = splits.pretrained_cfg_fields()
    >>> cfg["input_size"], cfg["interpolation"], cfg["crop_pct"], cfg["label_names"][:3], splits.test_split
    ((3, 16, 16), 'bilinear', 1.0, ['0', '1', '2'], 'test')
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset

DATASETS = ("digits",)
DIGITS_SPLIT = (0.6, 0.2, 0.2)
#: the timm data-config keys a run records (``timm.data.resolve_data_config`` reads them)
DATA_CONFIG_FIELDS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")


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
        data_config: how a raw image becomes an eval tensor, as timm's data config
            (``input_size``, ``interpolation``, ``crop_pct``, ``crop_mode``, ``mean``, ``std``).
        test_split: the split ``test`` really is: ``"test"``, or ``"val"`` when the
            folder has no ``test/`` (then its numbers are validation numbers).
    """

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    class_names: List[str]
    input_size: Tuple[int, int, int]
    data_config: Dict[str, Any]
    test_split: str = "test"

    def pretrained_cfg_fields(self) -> Dict[str, Any]:
        """What a checkpoint of this data records in its ``pretrained_cfg``: the data config,
        ``num_classes`` and ``label_names`` (timm's field names).

        ``timm.data.resolve_data_config({}, model=m)`` + ``timm.data.create_transform(**cfg)``
        on a raw image then reproduces the eval preprocessing of the run.
        """
        return {**{k: self.data_config[k] for k in DATA_CONFIG_FIELDS},
                "num_classes": self.num_classes, "label_names": list(self.class_names)}

    def limited(self, limit_train: Optional[int] = None, limit_eval: Optional[int] = None) -> "DataSplits":
        """The first ``limit_*`` samples of each split (for fast tests and smoke runs)."""

        def head(ds: Dataset, n: Optional[int]) -> Dataset:
            return ds if n is None or n >= len(ds) else Subset(ds, range(n))

        return dataclasses.replace(
            self, train=head(self.train, limit_train), val=head(self.val, limit_eval), test=head(self.test, limit_eval),
        )

    def train_subset(self, n: int, seed: int) -> "DataSplits":
        """A stratified random subset of ``n`` train images (the same ``n`` and ``seed``
        always draw the same images), repeated so that one epoch still has about as many
        samples as the full train split. Val and test stay whole.

        Repeating keeps the optimiser steps and validations per epoch, so runs on
        different subset sizes get the same schedule and compute (a learning-curve study
        then compares data, not training length).

        Example:
            >>> s = load_data("digits", img_size=8).train_subset(50, seed=0)
            >>> len(s.train), len({i for i in s.train.indices}), len(s.val)
            (1050, 50, 360)
            >>> sorted(torch.bincount(torch.stack([s.train[i][1] for i in range(50)])).tolist())[0]
            5
        """
        from sklearn.model_selection import train_test_split

        labels = _labels(self.train)
        if not self.num_classes <= n <= len(labels):
            raise DataError(f"--train-subset must be between the number of classes ({self.num_classes}) and the "
                            f"train split's {len(labels)} images, got {n}.")
        idx = list(range(len(labels)))
        chosen = idx if n == len(labels) else sorted(
            train_test_split(idx, train_size=n, stratify=labels, random_state=seed)[0])
        repeats = max(1, len(labels) // n)
        return dataclasses.replace(self, train=Subset(self.train, chosen * repeats))


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

    size = (3, img_size, img_size)
    data_config = {"input_size": size, "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
                   "mean": (float(mean),) * 3, "std": (float(std),) * 3}
    return DataSplits(
        split(train_idx), split(val_idx), split(test_idx), 10, [str(i) for i in range(10)], size, data_config
    )


def digit_image(digit: Any) -> Image.Image:
    """A raw ``load_digits`` image (8x8, values 0..16) as the RGB PIL image timm's transforms take.

    Example:
        >>> from sklearn.datasets import load_digits
        >>> digit_image(load_digits().images[0]).size, digit_image(load_digits().images[0]).mode
        ((8, 8), 'RGB')
    """
    import numpy as np

    return Image.fromarray(np.round(np.asarray(digit, dtype=np.float64) * 255 / 16).astype("uint8")).convert("RGB")


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


def _labels(ds: Dataset) -> List[int]:
    """Class index of every sample, without loading images (TensorDataset, timm ImageDataset, Subset)."""
    if isinstance(ds, Subset):
        inner = _labels(ds.dataset)
        return [inner[i] for i in ds.indices]
    if isinstance(ds, TensorDataset):
        return ds.tensors[1].tolist()
    return [int(target) for _, target in ds.reader.samples]


def _classes(ds) -> List[str]:
    mapping = ds.reader.class_to_idx
    return sorted(mapping, key=mapping.get)


def folder_splits(data_dir: str, img_size: int = 224, pretrained_cfg: Optional[Dict[str, Any]] = None) -> DataSplits:
    """ImageFolder splits from ``data_dir/{train,val[,test]}`` with timm's transforms.

    Normalisation and interpolation come from the model's ``pretrained_cfg`` when given
    (timm's ``resolve_data_config``), at input size ``img_size``; the eval transform is
    ``create_transform(**data_config, is_training=False)`` of the returned ``data_config``.
    Without ``test/`` the val split is reused as ``test`` and ``test_split`` is ``"val"``.
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
    test = _folder_split(root, "test", eval_tf, required=False)
    test_split = "test" if test is not None else "val"
    test = test if test is not None else val
    names = _classes(train)
    for split, ds in (("val", val), ("test", test)):
        if _classes(ds) != names:
            raise DataError(
                f"Class folders differ between train/ and {split}/ in {root}: "
                f"train has {names}, {split} has {_classes(ds)}."
            )
    data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in DATA_CONFIG_FIELDS}
    return DataSplits(train, val, test, len(names), names, tuple(cfg["input_size"]), data_config, test_split)


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
