"""Experiment tracking: timm ``train.py``'s ``--log-wandb`` (Weights & Biases), named by ``--experiment``.

:func:`start_tracking` returns a :class:`Tracker`: a no-op one unless ``log_wandb`` is set, else a
:class:`WandbTracker` whose run is ``wandb.init(project=wandb_project, name=experiment or the run
folder's name, config=the TrainConfig, tags=wandb_tags)`` as in timm's ``train.py``. Its files go to
``OUT/wandb/`` (``WANDB_DIR`` overrides it; ``WANDB_MODE=offline`` keeps the run on disk for a later
``wandb sync``). Every epoch's ``metrics.jsonl`` record is logged (lists as ``/depth<k>`` keys, per net
as ``val_accuracy/<net>/depth<k>``), the run's test accuracy per depth goes to the run summary, and
the run is finished with the training (exit code 1 when it failed).

Example:
    >>> start_tracking(TrainConfig(), "runs/x").log({"epoch": 1})  # without --log-wandb: nothing
    >>> flatten({"epoch": 1, "val_accuracy": {"net": [0.5, 0.75]}})
    {'epoch': 1, 'val_accuracy/net/depth1': 0.5, 'val_accuracy/net/depth2': 0.75}
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Union

from .config import TrainConfig


def flatten(record: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Numbers of a (nested) record under ``/``-joined keys; the k-th entry of a list is ``depth<k+1>``."""
    out: Dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "/"))
        elif isinstance(value, (list, tuple)):
            out.update({f"{name}/depth{k + 1}": v for k, v in enumerate(value) if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


class Tracker:
    """Where a run's records go besides its own folder; this base keeps none (no ``--log-wandb``)."""

    def log(self, record: Mapping[str, Any]) -> None:
        """One epoch's record (``metrics.jsonl``'s line)."""

    def summary(self, values: Mapping[str, Any]) -> None:
        """The run's final numbers."""

    def close(self, failed: bool = False) -> None:
        """End the run (once; later calls do nothing)."""


class WandbTracker(Tracker):
    """A wandb run of the training run (``--log-wandb``)."""

    def __init__(self, cfg: TrainConfig, out: Path, world_size: int = 1) -> None:
        import wandb

        try:
            self.run = wandb.init(project=cfg.wandb_project, name=cfg.experiment or out.absolute().name,
                                  config={**dataclasses.asdict(cfg), "world_size": world_size}, tags=cfg.wandb_tags,
                                  dir=os.environ.get("WANDB_DIR") or str(out),
                                  settings=wandb.Settings(silent=not cfg.progress))
        except Exception as e:  # noqa: BLE001 - no login, no network, a bad project name...: one line
            reason = " ".join(str(e).split())[:300] or type(e).__name__
            raise ValueError(f"--log-wandb: wandb.init failed ({reason}); log in with `wandb login`, or log to disk "
                             f"with WANDB_MODE=offline.") from None

    def log(self, record: Mapping[str, Any]) -> None:
        if self.run is not None:
            self.run.log(flatten(record), step=int(record["epoch"]) if "epoch" in record else None)

    def summary(self, values: Mapping[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(flatten(values))

    def close(self, failed: bool = False) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=1 if failed else 0)


def start_tracking(cfg: TrainConfig, out: Union[str, Path], world_size: int = 1, main: bool = True) -> Tracker:
    """The run's tracker: a :class:`WandbTracker` on the main process with ``--log-wandb``, else a no-op one."""
    if not (cfg.log_wandb and main):
        return Tracker()
    Path(out).mkdir(parents=True, exist_ok=True)
    return WandbTracker(cfg, Path(out), world_size)
