"""Best-epoch keeping (timm's ``--checkpoint-hist`` / ``--eval-metric``): the ``keep`` best
epochs of a run by a validation metric, as weight files in the run folder.

An epoch's score is its :data:`EVAL_METRICS` entry applied to the per-depth validation
accuracy of the net the run would deploy. Each kept epoch is ``best-<epoch>.pth``: the
recipe's weights (and the EMA weights, when kept), its validation accuracy and score, but
no optimizer state, read back with ``weights_only=True``. At the end of the run the best
epoch's weights are tested and published, so ``model/`` is the epoch chosen on validation.

Files are written atomically; an epoch that falls out of the top ``keep`` is deleted only
after ``last.pth`` (whose ledger names the kept epochs) has been written, so a crash at
any point leaves every epoch the checkpoint names on disk.

Example:
    >>> import tempfile
    >>> kept = BestEpochs(Path(tempfile.mkdtemp()), keep=2)
    >>> for epoch, score in enumerate([0.5, 0.9, 0.7, 0.6], start=1):
    ...     evicted = kept.offer(score, epoch, lambda: {"epoch": epoch})
    ...     kept.remove(evicted)
    >>> kept.ledger, sorted(p.name for p in kept.folder.iterdir())
    ([(0.9, 2), (0.7, 3)], ['best-2.pth', 'best-3.pth'])
    >>> score_of([0.8, 0.9, 1.0], "min_accuracy")
    0.8
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .state import CheckpointReadError, save_atomic

#: ``--eval-metric`` choices: how one net's per-depth validation accuracy becomes one score
EVAL_METRICS: Dict[str, Callable[[Sequence[float]], float]] = {
    "mean_accuracy": lambda acc: sum(acc) / len(acc),  # every depth counts the same (default)
    "full_accuracy": lambda acc: acc[-1],  # the deepest depth only
    "min_accuracy": lambda acc: min(acc),  # the weakest depth
}


def score_of(accuracy: Sequence[float], metric: str) -> float:
    """The ``metric`` (a key of :data:`EVAL_METRICS`) of one net's per-depth accuracy."""
    return float(EVAL_METRICS[metric](list(accuracy)))


class BestEpochs:
    """The ``keep`` best epochs by score, as ``best-<epoch>.pth`` in ``folder``.

    Args:
        folder: the run folder.
        keep: how many epochs to keep (0: none).
        ledger: ``(score, epoch)`` pairs already kept (from a resumed ``last.pth``).
    """

    def __init__(self, folder: Path, keep: int, ledger: Sequence[Sequence[Any]] = ()) -> None:
        self.folder, self.keep = folder, keep
        self.ledger: List[Tuple[float, int]] = [(float(s), int(e)) for s, e in ledger]

    def path(self, epoch: int) -> Path:
        return self.folder / f"best-{epoch}.pth"

    def offer(self, score: float, epoch: int, weights: Callable[[], Dict[str, Any]]) -> List[Path]:
        """Keep ``epoch`` when it ranks among the best (ties: the earlier epoch ranks first);
        ``weights()`` is only called then. Returns the files that fell out, for :meth:`remove`."""
        ranked = sorted([*self.ledger, (score, epoch)], key=lambda se: (-se[0], se[1]))
        kept = ranked[:self.keep]
        if (score, epoch) in kept:
            save_atomic(weights(), self.path(epoch))
        evicted = [self.path(e) for s, e in self.ledger if (s, e) not in kept]
        self.ledger = kept
        return evicted

    @staticmethod
    def remove(paths: Sequence[Path]) -> None:
        """Delete files :meth:`offer` evicted (after the checkpoint that no longer names them is written)."""
        for path in paths:
            path.unlink(missing_ok=True)

    def best(self) -> Optional[int]:
        """The best kept epoch, or ``None``."""
        return self.ledger[0][1] if self.ledger else None

    def load(self, epoch: int) -> Dict[str, Any]:
        """The weights kept for ``epoch`` (``weights_only=True``); a missing or unreadable file is a one-line error."""
        path = self.path(epoch)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - missing, truncated or foreign file
            raise CheckpointReadError(f"cannot read the best-epoch weights {path} ({type(e).__name__}); restore it "
                                      f"or rerun with --checkpoint-hist 0 to publish the last epoch.") from None
