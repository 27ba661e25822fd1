"""``python -m coopnets.train ...`` (also the entry point for ``torchrun ... -m coopnets.train``)."""
import sys

from ..cli.train import main

sys.exit(main())
