"""Training recipes; importing this package registers them all."""
from . import multi_exit  # noqa: F401
from . import cooperative  # noqa: F401
from . import byot, ekd, independent, mlcsd  # noqa: F401
