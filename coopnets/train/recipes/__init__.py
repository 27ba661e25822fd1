"""Training recipes; importing this package registers them all."""
from . import multi_exit  # noqa: F401
