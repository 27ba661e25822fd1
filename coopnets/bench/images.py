"""The images a load test sends, and how their answers are scored.

* **A folder** (:func:`load_folder`): its PNG and JPEG files (by suffix: ``.png``, ``.jpg``,
  ``.jpeg``; other files are skipped). When it holds **class folders** (the ImageFolder
  layout, ``DIR/<class>/**/<image>``) every image is labelled with its class; the classes are
  ordered as timm's folder reader (and so ``coopnets train --data-dir``) orders them: natural
  order of the folder names (``c2`` before ``c10``). A plain folder of images has no labels
  (effective accuracy is then not reported).
* **The digits test split** (:func:`digits_image_set`): scikit-learn's ``load_digits``, the
  test split of :mod:`coopnets.train.data` (same indices), each 8x8 digit as an 8-bit RGB PNG
  (``digit_image``), labelled ``"0"``..``"9"``; what ``benchmarks/serving.py`` sends too.

Scoring (:func:`score`): the server answers a class name (``label``) and an ``index``. With
``match="label"`` an answer is correct when its label is the image's class folder name; with
``"index"`` when its index is the class's position in the ordered classes; ``"auto"`` (default)
compares labels when any answered label is one of the class names, else indices.

Example:
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for cls in ("cat", "dog"):
    ...     (root / cls).mkdir()
    ...     _ = (root / cls / "a.png").write_bytes(b"\\x89PNG\\r\\n\\x1a\\n...")
    >>> s = load_folder(root)
    >>> len(s), s.class_names, s.labels.tolist(), s.content_types[0]
    (2, ['cat', 'dog'], [0, 1], 'image/png')
"""
from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["IMAGE_SUFFIXES", "ImageSet", "content_type", "digits_image_set", "digits_images", "digits_split_indices",
           "load_folder", "natural_key", "png_bytes", "score"]

#: image files read from a folder, and their content type when the file's signature does not say
IMAGE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
MATCHES = ("auto", "label", "index")


@dataclass
class ImageSet:
    """Request bodies with their content types; ``labels`` (class index per image) and ``class_names`` when
    the images are labelled, else ``None``."""

    bodies: List[bytes]
    content_types: List[str]
    source: str
    labels: Optional[np.ndarray] = None
    class_names: Optional[List[str]] = None
    names: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.bodies)

    @property
    def labelled(self) -> bool:
        return self.labels is not None


def natural_key(text: str) -> List[Any]:
    """The sort key of timm's folder reader: case-folded, digit runs compared as numbers.

    Example:
        >>> sorted(["c10", "c2", "B1"], key=natural_key)
        ['B1', 'c2', 'c10']
    """
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", text.lower())]


def content_type(body: bytes, name: str = "") -> str:
    """``image/png`` or ``image/jpeg`` from the file's signature (else from its suffix).

    Example:
        >>> content_type(b"\\xff\\xd8\\xff\\xe0..."), content_type(b"?", "x.png")
        ('image/jpeg', 'image/png')
    """
    if body.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if body.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    return IMAGE_SUFFIXES.get(Path(name).suffix.lower(), "application/octet-stream")


def _images_in(folder: Path, recursive: bool) -> List[Path]:
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted((p for p in files if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
                  key=lambda p: natural_key(str(p.relative_to(folder))))


def load_folder(path: Union[str, Path], max_images: Optional[int] = None, seed: int = 0) -> ImageSet:
    """The PNG/JPEG images of ``path`` (module docstring); ``ValueError`` naming the folder when it is missing
    or holds none. Over ``max_images``, a seeded random subset of that many is kept."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"--images {path}: not a folder; give a folder of PNG/JPEG images or of class folders of them")
    classes = sorted((d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                      and _images_in(d, recursive=True)), key=natural_key)
    files: List[Path]
    labels: Optional[List[int]]
    if classes:
        files, labels = [], []
        for k, name in enumerate(classes):
            found = _images_in(root / name, recursive=True)
            files += found
            labels += [k] * len(found)
    else:
        files, labels = _images_in(root, recursive=False), None
    if not files:
        raise ValueError(f"--images {path}: no PNG or JPEG images there (looked for "
                         f"{', '.join(IMAGE_SUFFIXES)} files, directly or in class folders)")
    keep = np.arange(len(files))
    if max_images is not None and len(files) > max_images:
        keep = np.sort(np.random.default_rng([seed, 7]).choice(len(files), size=max_images, replace=False))
    bodies, types, names = [], [], []
    for k in keep:
        body = files[k].read_bytes()
        bodies.append(body)
        types.append(content_type(body, files[k].name))
        names.append(str(files[k].relative_to(root)))
    return ImageSet(bodies, types, str(root), None if labels is None else np.asarray(labels, np.int64)[keep],
                    classes or None, names)


def digits_split_indices(split_seed: int = 0) -> dict:
    """The indices of ``load_digits`` in each split of :func:`coopnets.train.data.digits_splits` (same calls).

    Example:
        >>> {k: len(v) for k, v in digits_split_indices().items()}
        {'train': 1077, 'val': 360, 'test': 360}
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from coopnets.train.data import DIGITS_SPLIT

    y = np.asarray(load_digits().target)
    idx = list(range(len(y)))
    _, val_frac, test_frac = DIGITS_SPLIT
    rest, test_idx = train_test_split(idx, test_size=test_frac, stratify=y, random_state=split_seed)
    train_idx, val_idx = train_test_split(rest, test_size=val_frac / (1 - test_frac), stratify=y[rest],
                                          random_state=split_seed)
    return {"train": list(train_idx), "val": list(val_idx), "test": list(test_idx)}


def png_bytes(image: Any) -> bytes:
    """A PIL image as PNG bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def digits_images(split: str = "test") -> Tuple[List[Any], np.ndarray]:
    """The digits ``split`` as RGB PIL images (``coopnets.train.data.digit_image``) and their labels."""
    from sklearn.datasets import load_digits

    from coopnets.train.data import digit_image

    raw = load_digits()
    ids = digits_split_indices()[split]
    return [digit_image(raw.images[i]) for i in ids], np.asarray(raw.target[ids], dtype=np.int64)


def digits_image_set(split: str = "test") -> ImageSet:
    """The digits ``split`` as PNG request bodies labelled ``"0"``..``"9"`` (module docstring).

    Example:
        >>> s = digits_image_set()
        >>> len(s), s.class_names[:3], s.content_types[0], s.bodies[0][:4]
        (360, ['0', '1', '2'], 'image/png', b'\\x89PNG')
    """
    images, labels = digits_images(split)
    bodies = [png_bytes(im) for im in images]
    return ImageSet(bodies, ["image/png"] * len(bodies), f"digits:{split}", labels, [str(k) for k in range(10)],
                    [f"digits-{split}-{k}" for k in range(len(bodies))])


def score(images: ImageSet, items: Sequence[int], outcomes: Sequence[Any],
          match: str = "auto") -> Tuple[Optional[np.ndarray], Optional[str]]:
    """Per request, whether its answer is correct, and how it was matched (``label`` or ``index``); ``(None,
    None)`` for unlabelled images. Failed and unanswered requests are not correct.

    Example:
        >>> from coopnets.bench.openloop import Outcome
        >>> s = ImageSet([b"", b""], ["image/png"] * 2, "x", np.array([0, 1]), ["cat", "dog"])
        >>> outs = [Outcome(done=1, pred=5, label="cat"), Outcome(done=1, pred=1, label="cat")]
        >>> score(s, [0, 1], outs)
        (array([ True, False]), 'label')
        >>> score(s, [0, 1], [Outcome(done=1, pred=0, label="0"), Outcome(done=1, pred=1, label="1")])
        (array([ True,  True]), 'index')
    """
    if match not in MATCHES:
        raise ValueError(f"--label-match {match}: choose from {', '.join(MATCHES)}")
    if images.labels is None or images.class_names is None:
        return None, None
    truth = images.labels[np.asarray(items, dtype=np.int64)]
    answered = [not o.error and not math.isnan(float(o.done)) for o in outcomes]
    if match == "auto":
        seen = {o.label for o, a in zip(outcomes, answered) if a and o.label}
        match = "label" if seen & set(images.class_names) else "index"
    if match == "label":
        names = np.asarray(images.class_names, dtype=object)[truth]
        correct = np.array([a and o.label == n for o, a, n in zip(outcomes, answered, names)], dtype=bool)
    else:
        correct = np.array([a and o.pred == int(t) for o, a, t in zip(outcomes, answered, truth)], dtype=bool)
    return correct, match
