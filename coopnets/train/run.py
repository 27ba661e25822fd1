"""``train(cfg)``: the entry point of a training run (the CLI, benchmarks and users call this).

One :class:`~coopnets.train.trainer.Trainer` run, or, for a recipe whose options ask
for one run per depth (``independent`` without a ``depth`` option, see
:meth:`Recipe.runs_per_depth`), the sweep :func:`~coopnets.train.sweep.train_each_depth`.

Example:
    >>> from coopnets.train import TrainConfig, train
    >>> cfg = TrainConfig(out="/tmp/coopnets-doctest-run", model="test_resnet", method="multi_exit", epochs=1,
    ...                   img_size=16, limit_train=64, limit_eval=32, progress=False, profile_repeats=1)
    >>> import shutil; shutil.rmtree(cfg.out, ignore_errors=True)
    >>> train(cfg, echo=False)["deployable"]
    'net'
"""
from __future__ import annotations

from typing import Any, Dict

from .checks import check_config
from .config import TrainConfig
from .recipe import RECIPES
from .sweep import train_each_depth
from .trainer import Trainer


def train(cfg: TrainConfig, echo: bool = True) -> Dict[str, Any]:
    """Run ``cfg`` to completion; the summary is empty on ranks other than 0.

    Invalid settings raise ``ValueError`` before the run folder is touched (:func:`~coopnets.train.checks.check_config`).
    """
    check_config(cfg)
    recipe_cls = RECIPES.get(cfg.method)
    if recipe_cls is not None and recipe_cls.runs_per_depth(cfg.recipe_opts):
        return train_each_depth(cfg, echo)
    return Trainer(cfg, echo=echo).fit()
