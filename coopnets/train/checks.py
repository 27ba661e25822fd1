"""Every check of a :class:`~coopnets.train.TrainConfig` before a run builds or writes anything.

:meth:`TrainConfig.problems` checks types and ranges; :func:`config_problems` adds the
names that must be one of a set (method, plan, dataset, device, optimizer, scheduler, model)
and the options that go into a dataclass or a timm model (``recipe_opts`` into the recipe's
config, ``model_kwargs`` into the plan's config and the backbone's ``__init__``). Each
problem is one sentence naming the setting, the value and what is valid; :func:`check_config`
raises them all in one ``ValueError``. ``train()``, the :class:`~coopnets.train.Trainer` and
``coopnets train`` call it first.

Example:
    >>> check_config(TrainConfig(method="bogus", epochs=0))
    Traceback (most recent call last):
    ...
    ValueError: invalid settings: --epochs must be > 0 (got 0); --method must be one of byot, cooperative, ekd, independent, mlcsd, multi_exit (got 'bogus')
"""
from __future__ import annotations

from typing import List

from ..models import PLANS
from .build import model_problems, optimization_problems
from .config import TrainConfig
from .data import DATASETS
from .distributed import device_problem
from .recipe import RECIPES


def choice_problems(cfg: TrainConfig) -> List[str]:
    """Names outside their set of choices, and recipe/model options their dataclass or timm model refuses."""
    problems = [f"--{name} must be one of {', '.join(choices)} (got {value!r})"
                for name, value, choices in (("method", cfg.method, sorted(RECIPES)), ("plan", cfg.plan, PLANS),
                                             ("dataset", cfg.dataset, DATASETS)) if value not in choices]
    if cfg.method in RECIPES:
        try:
            RECIPES[cfg.method].config_cls.from_dict(cfg.recipe_opts)
        except ValueError as e:
            problems.append(f"--recipe-opt: {e}".rstrip("."))
    problems += [p for p in (device_problem(cfg.device),) if p]
    if cfg.plan in PLANS:
        problems += model_problems(cfg.model, cfg.plan, cfg.model_kwargs)
    return problems + optimization_problems(cfg)


def config_problems(cfg: TrainConfig) -> List[str]:
    """Every problem of ``cfg``: types first (nothing else is checked with a wrong type), then ranges and choices."""
    return cfg.type_problems() or cfg.problems() + choice_problems(cfg)


def check_config(cfg: TrainConfig) -> None:
    """Raise one ``ValueError`` naming every problem of ``cfg`` (see the module docstring)."""
    problems = config_problems(cfg)
    if problems:
        raise ValueError("invalid settings: " + "; ".join(problems))
