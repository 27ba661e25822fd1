"""Training: recipes (methods), shared losses, the trainer loop, data and the CLI."""
from . import recipes  # noqa: F401  (registers the recipes)
from .data import DataError, DataSplits, load_data
from .recipe import RECIPES, Recipe, RecipeConfig, RecipeOutput, create_recipe, register_recipe
from .trainer import TrainConfig, Trainer, train

__all__ = [
    "RECIPES", "DataError", "DataSplits", "Recipe", "RecipeConfig", "RecipeOutput", "TrainConfig", "Trainer",
    "create_recipe", "load_data", "register_recipe", "train",
]
