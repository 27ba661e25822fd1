"""A run's reproducible state: seeding, RNG states, and the checkpoint file ``last.pth``.

The checkpoint is written atomically (temp file + ``os.replace``) and read back with
``weights_only=True``: it holds tensors and plain data only, RNG states included, so a
resumed run continues bit-for-bit.

Example:
    >>> import tempfile, torch
    >>> seed_everything(0)
    >>> state = rng_state()
    >>> a = torch.rand(2)
    >>> folder = Path(tempfile.mkdtemp())
    >>> save_atomic({"rng": state}, folder / CHECKPOINT)
    >>> set_rng_state(torch.load(folder / CHECKPOINT, weights_only=True)["rng"])
    >>> torch.equal(torch.rand(2), a)
    True
"""
from __future__ import annotations

import os
import pickle
import random
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

#: the file name of a run's checkpoint, in its run folder
CHECKPOINT = "last.pth"


# --- reproducibility ------------------------------------------------------------------
def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def rng_state() -> Dict[str, Any]:
    """RNG states of torch (+CUDA), numpy and python as tensors/lists (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


# --- checkpoints ----------------------------------------------------------------------
def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file in the same folder, then ``os.replace``: never a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


#: what every checkpoint written by the trainer holds
CHECKPOINT_KEYS = ("recipe", "optimizer", "scheduler", "scaler", "epoch", "elapsed_s", "val_accuracy", "rng")


class CheckpointReadError(ValueError):
    """A ``last.pth`` that cannot be read or is not a coopnets training checkpoint (one-line message)."""


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Load a checkpoint written by the trainer (``weights_only=True``: tensors and plain data only).

    A truncated, corrupt or foreign file raises :class:`CheckpointReadError` naming the
    file and what to do, never a traceback of pickle internals.
    """
    advice = f"restore {path} from a copy or start a new run with another --out"
    try:
        with warnings.catch_warnings():  # torch's notes on foreign pickle protocols: the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise CheckpointReadError(f"cannot read checkpoint {path} (not a torch checkpoint file); it is truncated "
                                      f"or not a coopnets checkpoint: {advice}.") from None
        # a pickle of objects beyond tensors and plain data: never unpickled here (torch's advice would be unsafe)
        raise CheckpointReadError(f"{path} is not a coopnets training checkpoint: it pickles Python objects beyond "
                                  f"tensors and plain data, which coopnets never loads (that could run code); "
                                  f"{advice}.") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, unreadable file...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointReadError(f"cannot read checkpoint {path} ({type(e).__name__}: {reason[:200]}); "
                                  f"it is truncated or not a coopnets checkpoint: {advice}.") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointReadError(f"{path} is not a coopnets training checkpoint (missing {', '.join(missing)}): "
                                  f"{advice}.")
    return state


def prepare_run_dir(out: Path, resume: bool) -> Optional[Path]:
    """Check the run folder against ``resume``; return the checkpoint to resume from (if any).

    A folder that already holds a run is never overwritten without ``resume``.

    Example:
        >>> import tempfile
        >>> prepare_run_dir(Path(tempfile.mkdtemp()) / "fresh", resume=False) is None
        True
    """
    ckpt = out / CHECKPOINT
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a run folder; choose another --out.")
    if resume and not ckpt.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint {ckpt} to resume from.")
    if not resume and ckpt.exists():
        raise FileExistsError(f"{out} already holds a run ({ckpt}); pass --resume to continue it or choose another --out.")
    return ckpt if resume else None
