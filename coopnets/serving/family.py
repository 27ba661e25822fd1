"""The model-switching baseline: a family of separately trained models served as the depths of one.

A team without a depth-adaptive network holds its SLO by *model switching* (INFaaS; "model
switching", HotCloud'20): it serves several separately trained models of different cost and
runs a cheaper one under load. :class:`ModelFamily` is that family in the shape the serving
path expects of a depth-adaptive model (``num_depths``, ``forward_depth(x, k)``,
``resolve_depth``, ``pretrained_cfg``, ``num_classes``), so the same
:class:`~coopnets.serving.DepthController` chooses a *model* per batch with the same latency
model, and ``coopnets serve`` serves it with the same batcher, shedding and counters.

:meth:`ModelFamily.from_sweep` reads the folder of an ``independent`` sweep (``coopnets train
--method independent`` without ``--recipe-opt depth=``: one run per depth, ``OUT/depth{d}/``,
each training only the truncated network of depth ``d``). Member ``d`` is run ``d``'s network
cut to its trained depth (``model.export(d)``: its stem, stages and exit head, nothing deeper),
so the family's members cost what the one network's depths cost. All members stay loaded, so a
switch costs nothing; :attr:`ModelFamily.load_s` records what loading each from disk took,
the switch cost of a server that loads members on demand.

Example:
    >>> import torch, coopnets
    >>> members = [coopnets.wrap("test_resnet", num_classes=3).eval().export(d) for d in (1, 2)]
    >>> fam = ModelFamily(members, pretrained_cfg={"input_size": (3, 32, 32)}, num_classes=3,
    ...                   accuracies=[0.7, 0.9])
    >>> fam.num_depths, fam.forward_depth(torch.randn(2, 3, 32, 32), 2).shape
    (2, torch.Size([2, 3]))
    >>> fam.resolve_depth(-1), fam.recorded.values
    (2, [0.7, 0.9])
    >>> from coopnets.inference.profiler import parameter_bytes
    >>> fam.parameter_bytes() == sum(parameter_bytes(m) for m in members)
    True
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from torch import Tensor, nn

from ..hub import CONFIG_NAME, CheckpointError
from ..inference.profiler import parameter_bytes
from .calibration import SOURCE_VAL, RecordedAccuracies, recorded_accuracies

#: the sub-folder of an ``independent`` sweep that holds the run of depth ``d``
MEMBER_FOLDER = "depth{d}"


class ModelFamily(nn.Module):
    """Separately trained models, cheapest first, served as depths ``1..len(members)`` (see the module docstring).

    Args:
        members: the models, cheapest first; each maps a batch ``(N, C, H, W)`` to logits ``(N, num_classes)``.
        pretrained_cfg: the data config every member is fed with (timm's ``input_size``, ``mean``,
            ``std``, ...; ``label_names`` when known).
        num_classes: classes of every member.
        accuracies: each member's validation accuracy (what the controller trades them by).
        names: a name per member, for reports (default ``member1``...).
        load_s: seconds each member took to load from disk (default: unknown, NaN).
    """

    def __init__(self, members: Sequence[nn.Module], *, pretrained_cfg: Mapping[str, Any], num_classes: int,
                 accuracies: Sequence[float], names: Optional[Sequence[str]] = None,
                 load_s: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        if not members:
            raise ValueError("A ModelFamily needs at least one member.")
        for what, values in (("accuracies", accuracies), ("names", names), ("load_s", load_s)):
            if values is not None and len(values) != len(members):
                raise ValueError(f"ModelFamily: {len(members)} members but {len(values)} {what}.")
        self.members = nn.ModuleList(members)
        self.num_depths = len(members)
        self.num_classes = int(num_classes)
        self.pretrained_cfg: Dict[str, Any] = dict(pretrained_cfg)
        self.names: List[str] = list(names or (f"member{d}" for d in range(1, self.num_depths + 1)))
        self.load_s: List[float] = [float(s) for s in (load_s or [float("nan")] * self.num_depths)]
        #: the accuracy table the controller reads (:func:`~coopnets.serving.calibration.recorded_accuracies`)
        self.recorded = RecordedAccuracies([float(a) for a in accuracies], SOURCE_VAL)

    @classmethod
    def from_sweep(cls, folder: Union[str, Path]) -> "ModelFamily":
        """The family an ``independent`` sweep trained: member ``d`` is ``folder/depth{d}/model`` cut to depth ``d``.

        Raises:
            CheckpointError: ``folder`` holds no ``depth1/model``, a run is missing, or the runs
                disagree on classes or preprocessing (the message names the folder).
        """
        from ..models import create_model

        root = Path(folder)
        count = 0
        while (root / MEMBER_FOLDER.format(d=count + 1) / "model" / CONFIG_NAME).is_file():
            count += 1
        if count == 0:
            raise CheckpointError(f"{root} is not an `independent` sweep: expected "
                                  f"{root / MEMBER_FOLDER.format(d=1) / 'model' / CONFIG_NAME} (coopnets train "
                                  f"--method independent --out {root}, one run per depth).")
        members: List[nn.Module] = []
        accuracies: List[float] = []
        load_s: List[float] = []
        first: Optional[nn.Module] = None
        for d in range(1, count + 1):
            start = time.perf_counter()
            model = create_model(f"local-dir:{root / MEMBER_FOLDER.format(d=d) / 'model'}", pretrained=True).eval()
            member = model.export(d)
            load_s.append(time.perf_counter() - start)
            if first is None:
                first = model
                if model.num_depths != count:
                    raise CheckpointError(f"{root}: the sweep holds {count} runs but its model has {model.num_depths} "
                                          f"depths; finish the sweep (coopnets train --method independent --resume).")
            elif (model.num_classes, _data(model)) != (first.num_classes, _data(first)):
                raise CheckpointError(f"{root}: run {d} differs from run 1 in its classes or preprocessing; a family "
                                      f"is served with one preprocessing.")
            accuracies.append(recorded_accuracies(model).values[d - 1])
            members.append(member)
        assert first is not None
        return cls(members, pretrained_cfg=first.pretrained_cfg, num_classes=first.num_classes, accuracies=accuracies,
                   names=[f"{first.backbone_name}@depth{d}" for d in range(1, count + 1)], load_s=load_s)

    @staticmethod
    def is_sweep(folder: Union[str, Path]) -> bool:
        """Whether ``folder`` is an ``independent`` sweep's folder (it holds ``depth1/model`` and no ``model/``)."""
        root = Path(folder)
        return (root / MEMBER_FOLDER.format(d=1) / "model" / CONFIG_NAME).is_file() and not (root / "model").exists()

    def resolve_depth(self, depth: int) -> int:
        """``depth`` (a member, 1-based; ``-1``: the last) checked against ``1..num_depths``."""
        d = self.num_depths if depth == -1 else int(depth)
        if not 1 <= d <= self.num_depths:
            raise ValueError(f"depth {depth} is not a member of this family: valid are 1..{self.num_depths} (or -1).")
        return d

    def forward_depth(self, x: Tensor, depth: int) -> Tensor:
        """Logits of member ``depth`` (1-based)."""
        return self.members[self.resolve_depth(depth) - 1](x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the largest member."""
        return self.members[-1](x)

    def parameter_bytes(self) -> int:
        """Bytes of every member's parameters and buffers: what the family holds in memory for its weights."""
        return parameter_bytes(self)

    def describe(self) -> Dict[str, Any]:
        """What ``/stats`` reports of the family: each member's name, parameter bytes and load time."""
        return {"family": [{"name": n, "parameter_bytes": parameter_bytes(m), "load_s": s}
                           for n, m, s in zip(self.names, self.members, self.load_s)]}


def _data(model: Any) -> tuple:
    cfg = model.pretrained_cfg
    return tuple(cfg.get(k) for k in ("input_size", "mean", "std", "interpolation", "crop_pct"))


__all__ = ["MEMBER_FOLDER", "ModelFamily"]
