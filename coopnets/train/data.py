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
    timm's data flags (:class:`DataOptions`) change the size, channels and normalisation; the
    train split goes through timm's training transform only when augmentation is asked for.

``--data-dir PATH`` (ImageFolder)
    ``PATH/train/<class>/*`` and ``PATH/val/<class>/*`` (plus an optional ``PATH/test``;
    without it the val split doubles as test split), read through timm's
    ``create_dataset`` with transforms from ``resolve_data_config`` /
    ``create_transform`` (training augmentation on train only; the val/test transform is
    ``create_transform(**splits.data_config, is_training=False)``, so a checkpoint's
    recorded config reproduces it by construction). timm's ``--train-split``/``--val-split``
    name other split folders, ``--class-map`` picks and orders the classes (:class:`DataOptions`).
    Missing folders, empty splits and splits whose classes differ raise a :class:`DataError`
    naming the problem.

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
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset

DATASETS = ("digits",)
DIGITS_SPLIT = (0.6, 0.2, 0.2)
#: the seed of the digits split (:func:`load_data`'s default: every run is split the same way)
DIGITS_SPLIT_SEED = 0
#: the timm data-config keys a run records (``timm.data.resolve_data_config`` reads them)
DATA_CONFIG_FIELDS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")


class DataError(ValueError):
    """A dataset that cannot be used as given (bad path, empty split, class mismatch)."""


@dataclass
class DataOptions:
    """timm ``train.py``'s data and augmentation flags, as the arguments of the timm functions they go to.

    Attributes:
        in_chans, input_size, crop_pct, mean, std, interpolation: ``timm.data.resolve_data_config``'s
            ``args`` (``--in-chans``, ``--input-size``, ...; ``None``: the model's or the data's own).
        train_split, val_split: the ImageFolder split folders under ``--data-dir`` (``--train-split``,
            ``--val-split``); ``class_map``: ``timm.data.create_dataset``'s ``class_map`` (``--class-map``).
        augment: ``timm.data.create_transform``'s training arguments (``no_aug``, ``scale``, ``ratio``,
            ``hflip``, ``vflip``, ``color_jitter``, ``auto_augment``, ``re_prob``, ``re_mode``, ``re_count``).
        train_interpolation: the training resize's interpolation (``None``: the data config's).
        augmented: ``digits`` only: train through timm's training transform (augmentation was asked
            for) instead of the set's fixed, deterministic pipeline.
    """

    in_chans: Optional[int] = None
    input_size: Optional[Tuple[int, int, int]] = None
    crop_pct: Optional[float] = None
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    interpolation: Optional[str] = None
    train_split: str = "train"
    val_split: str = "val"
    class_map: Optional[str] = None
    augment: Dict[str, Any] = field(default_factory=dict)
    train_interpolation: Optional[str] = None
    augmented: bool = False

    def data_args(self, img_size: int) -> Dict[str, Any]:
        """``resolve_data_config``'s ``args``: these options over the input side ``img_size``."""
        return {"in_chans": self.in_chans, "input_size": self.input_size, "img_size": img_size, "crop_pct": self.crop_pct,
                "mean": self.mean, "std": self.std, "interpolation": self.interpolation}

    def train_transform(self, data_config: Dict[str, Any]):
        """timm's training transform for ``data_config`` (``create_transform(..., is_training=True)``), as
        timm's ``train.py`` makes it: the train interpolation unless ``no_aug``, then the augmentation."""
        from timm.data import create_transform

        interpolation = self.train_interpolation
        if self.augment.get("no_aug") or not interpolation:
            interpolation = data_config["interpolation"]
        return create_transform(**{**data_config, "interpolation": interpolation}, is_training=True, **self.augment)


class ImageSplit(Dataset):
    """``(transform(image), label)`` pairs of in-memory PIL images (digits under timm's training transform)."""

    def __init__(self, images: List[Image.Image], targets: torch.Tensor, transform) -> None:
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[i]), self.targets[i]


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

    def train_classes(self) -> List[str]:
        """The names of the classes the train split really holds (after ``limited``/``train_subset``).

        Example:
            >>> load_data("digits", img_size=8).limited(limit_train=2).train_classes()
            ['7', '8']
        """
        return [self.class_names[i] for i in sorted(set(_labels(self.train)))]

    def warn_if_misleading(self) -> None:
        """Warn when the train split has one class: every prediction is that class, so an accuracy of 1.000 says nothing."""
        present = self.train_classes()
        if len(present) < 2:
            where = f" of {self.num_classes}" if self.num_classes > 1 else ""
            warnings.warn(
                f"the train split holds one class{where} ({', '.join(present) or 'none'}): the nets can only learn to "
                f"predict it, so their accuracy says nothing. Give --data-dir a train/ folder with a subfolder per "
                f"class (at least 2){', or a larger --limit-train' if where else ''}.", UserWarning, stacklevel=2)

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


def digits_splits(img_size: int = 32, split_seed: int = DIGITS_SPLIT_SEED, options: Optional[DataOptions] = None) -> DataSplits:
    """The embedded ``digits`` set as stratified train/val/test splits of ``(3, img_size, img_size)`` tensors.

    ``options`` are timm's data flags: ``input_size`` / ``in_chans`` set the size and the channels
    (the grey digit replicated), ``mean`` / ``std`` replace the train split's. An ``interpolation``
    other than bilinear or a ``crop_pct`` other than 1 send every split through timm's eval transform
    of the recorded data config (``create_transform(**data_config)`` on :func:`digit_image`), and
    ``augmented`` trains through timm's training transform (:meth:`DataOptions.train_transform`);
    otherwise the splits are the set's own fixed tensors.

    Example:
        >>> s = digits_splits(img_size=8)
        >>> sorted(set(int(y) for _, y in s.test)) == list(range(10))
        True
        >>> digits_splits(options=DataOptions(input_size=(1, 12, 10), mean=(0.5,))).data_config["mean"]
        (0.5,)
    """
    from sklearn.datasets import load_digits

    options = options or DataOptions()
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    train_idx, val_idx, test_idx = _digits_split(y, split_seed)
    size = tuple(options.input_size or (options.in_chans or 3, img_size, img_size))
    chans = size[0]
    x = F.interpolate(x, size=size[1:], mode="bilinear", align_corners=False).repeat(1, chans, 1, 1)
    train_x = x[train_idx]
    mean = _per_channel(options.mean, chans) or (float(train_x.mean()),) * chans
    std = _per_channel(options.std, chans) or (float(train_x.std()),) * chans
    data_config = {"input_size": size, "interpolation": options.interpolation or "bilinear",
                   "crop_pct": options.crop_pct or 1.0, "crop_mode": "center", "mean": mean, "std": std}
    fixed = data_config["interpolation"] == "bilinear" and data_config["crop_pct"] == 1.0
    if fixed:
        x = (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    if not fixed or options.augmented:
        if chans not in (1, 3):
            raise DataError(f"digits through timm's transforms needs 1 or 3 channels (--in-chans), got {chans}.")
        from timm.data import create_transform

        images = [digit_image(d, "L" if chans == 1 else "RGB") for d in data.images]
        if not fixed:
            eval_tf = create_transform(**data_config, is_training=False)
            x = torch.stack([eval_tf(image) for image in images])

    def split(ids: List[int]) -> TensorDataset:
        return TensorDataset(x[ids], y[ids])

    train = split(train_idx)
    if options.augmented:
        train = ImageSplit([images[i] for i in train_idx], y[train_idx], options.train_transform(data_config))
    return DataSplits(train, split(val_idx), split(test_idx), 10, [str(i) for i in range(10)], size, data_config)


def _digits_split(y: torch.Tensor, split_seed: int) -> Tuple[List[int], List[int], List[int]]:
    """Train / val / test indices into ``load_digits()``: stratified on the labels ``y``, :data:`DIGITS_SPLIT`."""
    from sklearn.model_selection import train_test_split

    idx = list(range(len(y)))
    _, val_frac, test_frac = DIGITS_SPLIT
    rest, test_idx = train_test_split(idx, test_size=test_frac, stratify=y, random_state=split_seed)
    train_idx, val_idx = train_test_split(
        rest, test_size=val_frac / (1 - test_frac), stratify=y[rest], random_state=split_seed
    )
    return train_idx, val_idx, test_idx


def validation_images(dataset: str = "digits", data_dir: Optional[str] = None, split_seed: int = DIGITS_SPLIT_SEED,
                      options: Optional[DataOptions] = None) -> Tuple[List[Any], List[int], List[str]]:
    """The validation split of a run's data before any transform, in the split's order (what
    ``DataSplits.val`` holds, before :meth:`DataSplits.limited`): ``(images, labels, class_names)``.

    An image is a PIL image for ``digits`` (:func:`digit_image`, RGB) and the file path of an
    ImageFolder's ``data_dir/<options.val_split>/<class>/<image>`` (timm's reader, the classes
    numbered as training numbers them, ``options.class_map`` included). The test split is never read.

    Example:
        >>> images, labels, names = validation_images("digits")
        >>> len(images), images[0].size, labels[:3] == [int(y) for _, y in load_data("digits", img_size=8).val][:3]
        (360, (8, 8), True)
    """
    options = options or DataOptions()
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise DataError(f"--data-dir {root} does not exist or is not a directory.")
        ds = _folder_split(root, options.val_split, None, options=options)
        return [str(path) for path, _ in ds.reader.samples], _labels(ds), _classes(ds)
    if dataset != "digits":
        raise DataError(f"Unknown dataset {dataset!r}; use 'digits' or --data-dir PATH (ImageFolder).")
    from sklearn.datasets import load_digits

    data = load_digits()
    _, val_idx, _ = _digits_split(torch.tensor(data.target, dtype=torch.long), split_seed)
    return [digit_image(data.images[i]) for i in val_idx], [int(data.target[i]) for i in val_idx], \
        [str(i) for i in range(10)]


def _per_channel(values: Optional[Tuple[float, ...]], chans: int) -> Optional[Tuple[float, ...]]:
    """``--mean``/``--std`` as one value per channel (one value is every channel's, as in timm)."""
    if values is None:
        return None
    values = tuple(float(v) for v in values)
    return values * chans if len(values) == 1 else values


def digit_image(digit: Any, mode: str = "RGB") -> Image.Image:
    """A raw ``load_digits`` image (8x8, values 0..16) as the RGB (or ``mode``) PIL image timm's transforms take.

    Example:
        >>> from sklearn.datasets import load_digits
        >>> digit_image(load_digits().images[0]).size, digit_image(load_digits().images[0]).mode
        ((8, 8), 'RGB')
    """
    import numpy as np

    return Image.fromarray(np.round(np.asarray(digit, dtype=np.float64) * 255 / 16).astype("uint8")).convert(mode)


def _folder_split(root: Path, split: str, transform, required: bool = True, is_training: bool = False,
                  options: Optional[DataOptions] = None, img_mode: str = "RGB"):
    """One ImageFolder split through timm's dataset factory (``class_map``, ``input_img_mode``), checked for
    existence and content."""
    from timm.data import create_dataset

    options = options or DataOptions()
    path = root / split
    if not path.is_dir():
        if not required:
            return None
        raise DataError(f"Missing split folder {path}: --data-dir needs {options.train_split}/ and "
                        f"{options.val_split}/ subfolders of class folders (named by --train-split/--val-split).")
    class_map = options.class_map
    if class_map and Path(class_map).expanduser().exists():
        class_map = str(Path(class_map).expanduser().absolute())  # else timm looks for it in the split folder
    try:
        ds = create_dataset("", root=str(path), split=split, search_split=False, is_training=is_training,
                            class_map=class_map or None, input_img_mode=img_mode)
    except Exception as e:  # timm raises a bare RuntimeError/FileNotFoundError for an empty tree
        raise DataError(f"Split folder {path} has no images usable as {path}/<class>/<image>"
                        f"{' of the --class-map classes' if class_map else ''}: {e}") from e
    ds.transform = transform
    return ds


def _labels(ds: Dataset) -> List[int]:
    """Class index of every sample, without loading images (TensorDataset, timm ImageDataset, Subset)."""
    if isinstance(ds, Subset):
        inner = _labels(ds.dataset)
        return [inner[i] for i in ds.indices]
    if isinstance(ds, TensorDataset):
        return ds.tensors[1].tolist()
    if isinstance(ds, ImageSplit):
        return ds.targets.tolist()
    return [int(target) for _, target in ds.reader.samples]


def _classes(ds) -> List[str]:
    mapping = ds.reader.class_to_idx
    return sorted(mapping, key=mapping.get)


def folder_splits(data_dir: str, img_size: int = 224, pretrained_cfg: Optional[Dict[str, Any]] = None,
                  options: Optional[DataOptions] = None) -> DataSplits:
    """ImageFolder splits from ``data_dir/{train,val[,test]}`` with timm's transforms.

    The data config is timm's ``resolve_data_config`` of ``options`` (timm's ``--input-size``, ``--mean``...)
    over the model's ``pretrained_cfg`` when given, at input size ``img_size``; the train transform is
    :meth:`DataOptions.train_transform` (timm's augmentation flags), the eval transform
    ``create_transform(**data_config, is_training=False)`` of the returned ``data_config``. The split
    folders are ``options.train_split`` / ``options.val_split`` (default ``train`` / ``val``); images are
    read as RGB, or greyscale for a data config of one channel (as timm's ``train.py``).
    Without ``test/`` the val split is reused as ``test`` and ``test_split`` is ``"val"``.
    """
    from timm.data import create_transform, resolve_data_config

    options = options or DataOptions()
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"--data-dir {root} does not exist or is not a directory.")
    cfg = resolve_data_config(options.data_args(img_size), pretrained_cfg=pretrained_cfg or {})
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    eval_tf = create_transform(**cfg, is_training=False)
    read = dict(options=options, img_mode="RGB" if cfg["input_size"][0] == 3 else "L")
    train = _folder_split(root, options.train_split, options.train_transform(cfg), is_training=True, **read)
    val = _folder_split(root, options.val_split, eval_tf, **read)
    test = _folder_split(root, "test", eval_tf, required=False, **read)
    test_split = "test" if test is not None else "val"
    test = test if test is not None else val
    names = _classes(train)
    for split, ds in ((options.val_split, val), ("test", test)):
        if _classes(ds) != names:
            raise DataError(
                f"Class folders differ between {options.train_split}/ and {split}/ in {root}: "
                f"{options.train_split} has {names}, {split} has {_classes(ds)}."
            )
    data_config = {k: v for k, v in cfg.items() if k in DATA_CONFIG_FIELDS}
    return DataSplits(train, val, test, len(names), names, tuple(cfg["input_size"]), data_config, test_split)


def load_data(
    dataset: str = "digits",
    data_dir: Optional[str] = None,
    img_size: int = 32,
    pretrained_cfg: Optional[Dict[str, Any]] = None,
    split_seed: int = DIGITS_SPLIT_SEED,
    options: Optional[DataOptions] = None,
) -> DataSplits:
    """Dispatch: ``digits`` (embedded) unless ``data_dir`` is given (ImageFolder); ``options``: timm's data flags.

    Example:
        >>> load_data("mnist")
        Traceback (most recent call last):
        ...
        coopnets.train.data.DataError: Unknown dataset 'mnist'; use 'digits' or --data-dir PATH (ImageFolder).
    """
    if data_dir is not None:
        return folder_splits(data_dir, img_size=img_size, pretrained_cfg=pretrained_cfg, options=options)
    if dataset != "digits":
        raise DataError(f"Unknown dataset {dataset!r}; use 'digits' or --data-dir PATH (ImageFolder).")
    return digits_splits(img_size=img_size, split_seed=split_seed, options=options)
