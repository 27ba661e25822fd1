"""Training: recipes (methods), shared losses, the trainer loop, data and the CLI."""
from . import recipes  # noqa: F401  (registers the recipes)
from .recipe import RECIPES, Recipe, RecipeConfig, RecipeOutput, create_recipe, register_recipe

__all__ = ["RECIPES", "Recipe", "RecipeConfig", "RecipeOutput", "create_recipe", "register_recipe"]
