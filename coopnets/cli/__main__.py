"""``python -m coopnets.cli ...``: the ``coopnets`` command."""
import sys

from . import main

sys.exit(main())
