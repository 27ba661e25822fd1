"""Small helpers for modules."""
from __future__ import annotations

import contextlib
from typing import Iterator, TypeVar

from torch import nn

M = TypeVar("M", bound=nn.Module)


@contextlib.contextmanager
def eval_mode(module: M) -> Iterator[M]:
    """Run ``module`` in eval mode inside the block, then give every submodule back its own flag.

    ``module.train(was_training)`` would set one flag on the whole tree; this restores
    each submodule's ``training`` exactly as it was (a frozen BatchNorm inside a net that
    trains stays frozen), also when the block raises.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
        >>> _ = net[1].eval()  # a frozen BatchNorm
        >>> with eval_mode(net) as m:
        ...     [x.training for x in m.modules()]
        [False, False, False]
        >>> [x.training for x in net.modules()]
        [True, True, False]
    """
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in flags:
            m.training = training
