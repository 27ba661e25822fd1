"""One run per depth: the ``independent`` baseline, and the combined table of its runs.

Example:
    >>> from coopnets.train import TrainConfig, train
    >>> cfg = TrainConfig(out="/tmp/coopnets-doctest-ind", model="test_resnet", method="independent", epochs=1,
    ...                   img_size=16, limit_train=64, limit_eval=32, progress=False, profile_repeats=1)
    >>> import shutil; shutil.rmtree(cfg.out, ignore_errors=True)
    >>> summary = train(cfg, echo=False)  # no depth option: train() hands it to train_each_depth
    >>> len(summary["runs"]), len(summary["test_accuracy"])
    (4, 4)
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, List, Tuple

from .build import count_depths
from .config import TrainConfig
from .folder import RunLock, check_claimable, check_owned
from .report import write_results
from .state import CHECKPOINT
from .state import load_checkpoint
from .trainer import Trainer, check_resume

ABOUT = ("One run per depth (`depth{d}/`), each training only that depth's truncated network; `accuracy` at "
         "depth d is run d's test accuracy, the wall time is the sum over runs. Each run's own `model/` holds its "
         "weights.")


def train_each_depth(cfg: TrainConfig, echo: bool = True) -> Dict[str, Any]:
    """One run per depth, in ``OUT/depth{d}``, each with the recipe option ``depth=d``.

    For ``independent`` this is the baseline: run ``d`` trains only the truncated network
    of depth ``d`` (its stem, stages and exit). Each run is a complete run folder of its
    own (checkpoint, metrics, ``model/``).
    ``OUT/results.md`` and ``results.png`` combine them: depth ``d``'s row comes from
    run ``d``; ``wall_time_s`` is the sum over runs, the cost of obtaining every depth.
    With ``resume=True`` finished runs are kept, an interrupted one continues from its
    checkpoint and missing ones start. The number of depths is asked of the model
    factory (:func:`~coopnets.train.build.count_depths`) before any run starts.
    """
    out = Path(cfg.out)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if main_rank:
        check_claimable(out)
    else:
        check_owned(out)
    lock = RunLock.acquire(out) if main_rank else None  # one sweep writes OUT at a time
    done = False
    try:
        summary = _sweep(cfg, out, echo)
        done = True
        return summary
    finally:
        if lock is not None:
            lock.release(failed=not done)  # a refused sweep leaves no folder it created


def _sweep(cfg: TrainConfig, out: Path, echo: bool) -> Dict[str, Any]:
    num_depths = count_depths(cfg.model, cfg.plan, cfg.model_kwargs)
    subs = [dataclasses.replace(cfg, out=str(out / f"depth{d}"), recipe_opts={**cfg.recipe_opts, "depth": d},
                                resume=cfg.resume and (out / f"depth{d}" / CHECKPOINT).is_file())
            for d in range(1, num_depths + 1)]
    for sub in subs:  # refuse before any run starts (or rewrites a finished one)
        if sub.resume:
            check_resume(sub, Path(sub.out), int(os.environ.get("WORLD_SIZE", "1")))
            load_checkpoint(Path(sub.out) / CHECKPOINT)
    summaries: List[Dict[str, Any]] = []
    for depth, sub in enumerate(subs, start=1):
        run_dir = Path(sub.out)
        trainer = Trainer(sub, echo=echo)
        trainer.log(f"{cfg.method}: run for depth {depth} of {num_depths} -> {run_dir}")
        summaries.append(trainer.fit())
    if not trainer.dist.is_main:
        return {}
    info, rows = combine_runs(cfg, summaries, trainer.dist.world_size)
    trainer.log(write_results(out, info, rows, ABOUT))
    return {**info, "per_depth": rows, "test_accuracy": info["test_accuracy"]["each depth alone"]}


def combine_runs(
    cfg: TrainConfig, summaries: List[Dict[str, Any]], world_size: int
) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """The sweep's training record and per-depth rows: row ``d`` from run ``d``, wall times summed."""
    out = Path(cfg.out)
    rows = [dict(s["per_depth"][d]) for d, s in enumerate(summaries)]
    info = {"method": cfg.method, "model": cfg.model, "dataset": cfg.data_dir or cfg.dataset, "epochs": cfg.epochs,
            "seed": cfg.seed, "command": cfg.command(world_size), "deployable": None,
            "wall_time_s": sum(s["wall_time_s"] for s in summaries),
            "run_wall_time_s": [s["wall_time_s"] for s in summaries],
            "test_accuracy": {"each depth alone": [r["accuracy"] for r in rows]},
            "runs": [str(out / f"depth{d}") for d in range(1, len(summaries) + 1)]}
    return info, rows
