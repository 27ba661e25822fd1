"""Training: recipes (methods), shared losses, the trainer loop and the data.

Modules, one job each: :mod:`.config` (``TrainConfig``), :mod:`.build` (nets, loaders,
optimizer), :mod:`.trainer` (the loop), :mod:`.state` (seeds, RNG, checkpoint),
:mod:`.report` (metrics, table, plot), :mod:`.sweep` (one run per depth), :mod:`.run` (``train``),
:mod:`.distributed` (DDP), :mod:`.data`, :mod:`.recipe` / :mod:`.recipes`. The command
line is :mod:`coopnets.cli.train` (``coopnets train`` / ``python -m coopnets.train``).
"""
from . import recipes  # noqa: F401  (registers the recipes)
from .config import TrainConfig
from .data import DataError, DataSplits, load_data
from .recipe import RECIPES, Recipe, RecipeConfig, RecipeOutput, SingleNetRecipe, create_recipe, register_recipe
from .run import train
from .trainer import Trainer

__all__ = [
    "RECIPES", "DataError", "DataSplits", "Recipe", "RecipeConfig", "RecipeOutput", "SingleNetRecipe", "TrainConfig",
    "Trainer", "create_recipe", "load_data", "register_recipe", "train",
]
