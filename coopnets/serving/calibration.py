"""What the depth controller trades depths by: per-depth accuracies, recorded or measured, and calibration data.

Choosing a depth by its *test* accuracy would let the test set steer the model, so serving
reads *validation* accuracies first. :func:`recorded_accuracies` reads them from the
checkpoint's ``config.json``, in this order:

1. ``coopnets.per_depth[*].val_accuracy`` (``coopnets train`` records it: the deployable
   net's validation accuracy at the selected epoch);
2. ``coopnets.training.val_accuracy[<training.deployable>]`` (runs of older coopnets recorded
   the validation accuracy of every net there);
3. ``coopnets.per_depth[*].accuracy``, the test accuracy, with a :attr:`RecordedAccuracies.warning`
   that says so (the server logs it).

:func:`load_calibration` reads labelled calibration batches, preprocessed exactly as the server
preprocesses a request (``timm.data.resolve_data_config(model=m)`` + ``timm.data.create_transform``
on the image converted to RGB), from an ImageFolder or from a training run folder (its
validation split, rebuilt from what the run recorded; never its test split).
:meth:`DepthController.for_model(model, slo_ms, calibration=batches) <coopnets.serving.DepthController.for_model>`
measures every depth on them (:func:`measured_accuracies`) and adds early-exit options.

Example:
    >>> import tempfile, torch, coopnets
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> root = Path(tempfile.mkdtemp())
    >>> for name, color in (("cat", (200, 40, 40)), ("dog", (40, 40, 200))):
    ...     (root / name).mkdir()
    ...     for i in range(3):
    ...         Image.new("RGB", (24, 20), color).save(root / name / f"{i}.png")
    >>> m = coopnets.wrap("test_resnet", num_classes=2).eval()
    >>> m.pretrained_cfg["input_size"] = (3, 32, 32)
    >>> batches = load_calibration(root, m, batch_size=4)
    >>> [tuple(x.shape) for x, _ in batches], torch.cat([y for _, y in batches]).tolist()
    ([(4, 3, 32, 32), (2, 3, 32, 32)], [0, 0, 0, 1, 1, 1])
    >>> len(measured_accuracies(m, batches))
    4
    >>> rows = [{"depth": d, "accuracy": 0.5 + d / 10, "val_accuracy": 0.4 + d / 10} for d in range(1, 5)]
    >>> folder = coopnets.save_pretrained(m, tempfile.mkdtemp() + "/ckpt", per_depth=rows,
    ...                                   data_config={"label_names": ["cat", "dog"]})
    >>> rec = recorded_accuracies(coopnets.create_model(f"local-dir:{folder}", pretrained=True))
    >>> [round(v, 2) for v in rec.values], rec.source, rec.warning
    ([0.5, 0.6, 0.7, 0.8], 'val_accuracy', None)
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..hub import CheckpointError, HubLocation, read_config

if TYPE_CHECKING:
    from PIL import Image

    from ..models.depth_adaptive import DepthAdaptiveModel

#: :attr:`RecordedAccuracies.source` values, in the order :func:`recorded_accuracies` tries them
SOURCE_VAL = "val_accuracy"
SOURCE_TRAINING_VAL = "training.val_accuracy"
SOURCE_TEST = "test accuracy (no validation recorded)"
#: the seed of the subsample :func:`load_calibration` draws when a source holds more than ``max_items`` images
CALIBRATION_SEED = 0
#: what :func:`load_calibration` accepts, for its messages
CALIBRATION_SOURCES = ("an ImageFolder (one subfolder of PNG/JPEG images per class) or a training run folder "
                       "(`coopnets train --out RUN`: its validation split)")
#: folder names of dataset splits (an ImageFolder's classes are never only these)
_SPLIT_NAMES = ("train", "val", "validation", "test")
_ACCURACIES_HINT = "pass accuracies=[acc at depth 1, ..., acc at full depth] or labelled calibration= batches"


@dataclass(frozen=True)
class RecordedAccuracies:
    """Per-depth accuracies a checkpoint records (:func:`recorded_accuracies`).

    Attributes:
        values: accuracy in [0, 1] per depth, depth 1 first.
        source: where they come from: :data:`SOURCE_VAL` (``"val_accuracy"``),
            :data:`SOURCE_TRAINING_VAL` (``"training.val_accuracy"``) or :data:`SOURCE_TEST`.
        warning: a sentence for the log when they are test accuracies, else ``None``.
    """

    values: List[float]
    source: str
    warning: Optional[str] = None


def _numbers(values: Any, n: int) -> Optional[List[float]]:
    """``values`` as ``n`` floats, or ``None`` when it is not a list of ``n`` numbers."""
    if not isinstance(values, (list, tuple)) or len(values) != n:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return None
    return [float(v) for v in values]


def recorded_accuracies(model: "DepthAdaptiveModel") -> RecordedAccuracies:
    """The per-depth accuracies recorded in the checkpoint ``model`` was loaded from, validation first.

    A model that carries its own table in ``recorded`` (:class:`~coopnets.serving.family.ModelFamily`)
    gives that. Otherwise, in this order: ``coopnets.per_depth[*].val_accuracy``; else ``coopnets.training.val_accuracy``
    of the deployable net (``training.deployable``); else ``coopnets.per_depth[*].accuracy``
    (test accuracies) with a :attr:`~RecordedAccuracies.warning`.

    Raises:
        ValueError: the model was not loaded from a coopnets checkpoint, its ``config.json``
            cannot be read, or it records none of these for every depth; the message says to
            pass ``accuracies=`` (or ``calibration=``) instead.
    """
    own = getattr(model, "recorded", None)
    if isinstance(own, RecordedAccuracies):  # a model that carries its own table (a ModelFamily)
        return own
    cfg = model.pretrained_cfg
    location = None
    if cfg.get("source") in ("local-dir", "hf-hub") or str(cfg.get("architecture", "")).startswith("coop_"):
        location = HubLocation.from_pretrained_cfg(cfg)
    if location is None:
        raise ValueError(f"{model.backbone_name}: the model was not loaded from a coopnets checkpoint, so it has "
                         f"no recorded per-depth accuracy table; {_ACCURACIES_HINT}.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the loader already warned about a missing data config
            coop = read_config(location)["coopnets"]
    except CheckpointError as err:
        raise ValueError(f"{location}: could not read the per-depth accuracy table ({' '.join(str(err).split())}); "
                         f"{_ACCURACIES_HINT}.") from err
    n = model.num_depths
    rows = {r.get("depth"): r for r in coop.get("per_depth") or [] if isinstance(r, dict)}

    def column(key: str) -> List[Any]:
        return [rows.get(d, {}).get(key) for d in range(1, n + 1)]

    val = _numbers(column("val_accuracy"), n)
    if val is not None:
        return RecordedAccuracies(val, SOURCE_VAL)
    training = coop.get("training") or {}
    per_net = training.get("val_accuracy")
    deployable = training.get("deployable")
    if isinstance(per_net, dict) and deployable in per_net:
        val = _numbers(per_net[deployable], n)
        if val is not None:
            return RecordedAccuracies(val, SOURCE_TRAINING_VAL)
    test = _numbers(column("accuracy"), n)
    if test is not None:
        warning = (f"{location} records no validation accuracy per depth, so the controller trades depths by the "
                   f"TEST accuracies of config.json's coopnets.per_depth (the test set then steers which depth "
                   f"serves); retrain with this coopnets to record val_accuracy, or pass labelled validation "
                   f"data as calibration (load_calibration).")
        return RecordedAccuracies(test, SOURCE_TEST, warning)

    def missing(values: List[Any]) -> List[int]:
        return [d for d, v in enumerate(values, 1) if not isinstance(v, (int, float)) or isinstance(v, bool)]

    raise ValueError(f"{location}: config.json's coopnets.per_depth records no val_accuracy for depth(s) "
                     f"{missing(column('val_accuracy'))} and no accuracy for depth(s) {missing(column('accuracy'))}, "
                     f"and coopnets.training.val_accuracy has no list for the deployable net; {_ACCURACIES_HINT}.")


def measured_accuracies(model: "DepthAdaptiveModel", batches: Sequence[Tuple[Tensor, Tensor]]) -> List[float]:
    """Top-1 accuracy of every depth (``forward_depth``) on labelled ``batches``, depth 1 first."""
    device = next(model.parameters()).device
    correct, total = [0] * model.num_depths, 0
    with torch.inference_mode():
        for x, y in batches:
            x, y = x.to(device), torch.as_tensor(y).to(device)
            total += len(y)
            for d in range(1, model.num_depths + 1):
                correct[d - 1] += int((model.forward_depth(x, d).argmax(-1) == y).sum())
    if not total:
        raise ValueError("The calibration batches hold no samples.")
    return [c / total for c in correct]


# --- calibration data -------------------------------------------------------------------------
def _refuse(path: Any, problem: str) -> ValueError:
    """The one-line error of a calibration source: ``calibration PATH: PROBLEM; give SOURCES``."""
    return ValueError(f"calibration {path}: {problem}; give {CALIBRATION_SOURCES}.")


def _natural_key(text: str) -> List[Any]:
    from timm.utils.misc import natural_key

    return natural_key(text)


def _image_folder(root: Path) -> Tuple[List[str], List[int], List[str]]:
    """An ImageFolder's image paths, labels (its classes in timm's order) and class names."""
    from timm.data.readers.img_extensions import get_img_extensions

    types = get_img_extensions(as_set=True)
    entries = sorted(os.scandir(root), key=lambda e: _natural_key(e.name))
    stray = [e.name for e in entries if e.is_file() and os.path.splitext(e.name)[1].lower() in types]
    if stray:
        raise _refuse(root, f"holds images outside class subfolders ({', '.join(stray[:3])}); put each image in a "
                            f"subfolder named by its class")
    classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    splits = [c for c in classes if c in _SPLIT_NAMES]
    if splits and len(splits) == len(classes) and len(classes) > 1:
        raise _refuse(root, f"looks like a dataset root with split folders ({', '.join(classes)}), not one split; "
                            f"give its validation split folder"
                            f"{next((f' ({root / c})' for c in ('val', 'validation') if c in classes), '')}")
    paths: List[str] = []
    labels: List[int] = []
    for index, name in enumerate(classes):
        found = []
        for folder, subdirs, files in os.walk(root / name, followlinks=True):
            subdirs[:] = [s for s in subdirs if not s.startswith(".")]
            found += [os.path.join(folder, f) for f in files
                      if not f.startswith(".") and os.path.splitext(f)[1].lower() in types]
        found.sort(key=_natural_key)
        paths += found
        labels += [index] * len(found)
    if not paths:
        what = f"its {len(classes)} class subfolders hold" if classes else "it has no class subfolders and holds"
        raise _refuse(root, f"{what} no PNG or JPEG images")
    return paths, labels, classes


def _run_validation(run: Path, saved: Dict[str, Any]) -> Tuple[List[Any], List[int], List[str]]:
    """A run folder's validation split as the run saw it (``limit_eval`` included): images, labels, class names."""
    from ..train.config import TrainConfig
    from ..train.data import DIGITS_SPLIT_SEED, DataError, validation_images
    from ..train.timm_flags import data_options

    known = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k in known})
    try:
        images, labels, names = validation_images(cfg.dataset, cfg.data_dir, saved.get("split_seed", DIGITS_SPLIT_SEED),
                                                  data_options(cfg))
    except (DataError, TypeError, ValueError) as e:
        data = f"--data-dir {cfg.data_dir}" if cfg.data_dir else f"--dataset {cfg.dataset}"
        raise _refuse(run, f"the run's validation split cannot be rebuilt from its data ({data}: "
                           f"{' '.join(str(e).split())}); give that split as an ImageFolder instead") from None
    limit = cfg.limit_eval
    if limit is not None and limit < len(images):  # DataSplits.limited: the first limit_eval samples
        images, labels = images[:limit], labels[:limit]
    if not images:
        raise _refuse(run, "the run's validation split is empty")
    return images, labels, names


def _class_indices(path: Any, names: List[str], model: "DepthAdaptiveModel") -> List[int]:
    """The model's class index of each of the source's classes ``names`` (by label name, else by position)."""
    label_names = [str(n) for n in model.pretrained_cfg.get("label_names") or []]
    known = [n for n in names if n in label_names]
    if label_names and len(known) == len(names):
        return [label_names.index(n) for n in names]
    if known:
        unknown = [n for n in names if n not in label_names]
        raise _refuse(path, f"class folders {unknown[:5]} are not among the model's label names "
                            f"({', '.join(label_names[:10])}{', ...' if len(label_names) > 10 else ''}) while "
                            f"{known[:5]} are; name every class folder by one of them")
    if len(names) > model.num_classes:
        raise _refuse(path, f"{len(names)} classes but the model has {model.num_classes}; classes map to the model's "
                            f"by position (or by label name: {label_names[:5] or 'the model records none'})")
    return list(range(len(names)))


def _open_rgb(source: Any, where: Any) -> "Image.Image":
    """A PIL image (digits) or an image file, as the RGB image the server's transform takes."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except Exception as e:  # PIL raises several types for broken files
        raise _refuse(where, f"cannot read the image {source} ({type(e).__name__}: {' '.join(str(e).split())}); "
                             f"remove or replace it") from None


def load_calibration(
    path: Union[str, "os.PathLike[str]"],
    model: "DepthAdaptiveModel",
    *,
    max_items: int = 512,
    batch_size: int = 64,
    seed: int = CALIBRATION_SEED,
) -> List[Tuple[Tensor, Tensor]]:
    """Labelled ``(images (N, C, H, W), labels (N,))`` batches for :meth:`DepthController.for_model`'s ``calibration``.

    Every image is preprocessed exactly as the server preprocesses a request: converted to RGB,
    then ``timm.data.create_transform(**timm.data.resolve_data_config(model=model))``.

    Args:
        path: an ImageFolder (a subfolder of PNG/JPEG images per class, nested folders allowed;
            classes map to the model's by ``model.pretrained_cfg['label_names']`` when every
            folder name is one of them, else by position in timm's ImageFolder order, as
            ``coopnets train --data-dir`` numbers them), or a training run folder
            (``coopnets train --out RUN``): its validation split rebuilt from the run's
            ``config.json`` (dataset or ``--data-dir``, split seed, ``--val-split``, ``--class-map``,
            ``--limit-eval``) through :func:`coopnets.train.data.validation_images`; never the
            test split.
        model: the model that will serve (its data config and classes).
        max_items: at most this many images: a seeded random subsample (in source order) when
            the source holds more.
        batch_size: images per batch (the last one may be smaller).
        seed: the subsample's seed.

    Raises:
        ValueError: one line naming the problem and what to give instead: ``path`` is not a
            folder, holds no images, holds an unreadable image, has more classes than the model,
            or is a run folder whose validation split cannot be rebuilt.
    """
    import timm.data

    for name, value in (("max_items", max_items), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} {value!r}: must be an integer >= 1")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise _refuse(path, "does not exist" if not root.exists() else "is a file, not a folder")
    config_file = root / "config.json"
    saved: Any = None
    if config_file.is_file():
        try:
            saved = json.loads(config_file.read_text())
        except (OSError, ValueError):
            saved = None
    from ..train.folder import RUN_CONFIG_KEYS

    if isinstance(saved, dict) and all(k in saved for k in RUN_CONFIG_KEYS):
        sources, labels, names = _run_validation(root, saved)
    elif isinstance(saved, dict) and "coopnets" in saved:
        raise _refuse(path, "is a checkpoint folder, which holds no data; give the run folder it was trained in "
                            "(its parent, for RUN/model)")
    else:
        sources, labels, names = _image_folder(root)
    mapping = _class_indices(path, names, model)
    order = list(range(len(sources)))
    if len(order) > max_items:
        generator = torch.Generator().manual_seed(int(seed))
        order = sorted(torch.randperm(len(order), generator=generator)[:max_items].tolist())
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    batches: List[Tuple[Tensor, Tensor]] = []
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        x = torch.stack([transform(_open_rgb(sources[i], path)) for i in chunk])
        y = torch.tensor([mapping[labels[i]] for i in chunk], dtype=torch.long)
        batches.append((x, y))
    return batches


__all__ = ["RecordedAccuracies", "SOURCE_TEST", "SOURCE_TRAINING_VAL", "SOURCE_VAL", "load_calibration",
           "measured_accuracies", "recorded_accuracies"]
