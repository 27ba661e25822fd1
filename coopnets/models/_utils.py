"""Small helpers for modules: :func:`eval_mode` and the one :func:`default_input_size`."""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Optional, Tuple, TypeVar

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


#: the image size a model is measured at when nothing else says (timm's own default)
DEFAULT_IMAGE_HW = (224, 224)


def default_input_size(pretrained_cfg: Dict[str, Any], in_chans: Optional[int] = None) -> Tuple[int, int, int]:
    """The one default input size (C, H, W): ``pretrained_cfg["input_size"]``'s spatial size (224 x 224
    when it has none) with ``in_chans`` channels (default: the config's, else 3).

    Every part of coopnets that needs an input size and is given none (profiling, early-exit
    costs, traced segments, export examples, latency budgets) asks this function.

    Example:
        >>> default_input_size({"input_size": (3, 32, 32)}, in_chans=1)
        (1, 32, 32)
        >>> default_input_size({})
        (3, 224, 224)
    """
    size = tuple(pretrained_cfg.get("input_size") or (3, *DEFAULT_IMAGE_HW))
    return (int(in_chans if in_chans is not None else size[0]), int(size[-2]), int(size[-1]))
