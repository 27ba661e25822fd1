"""Where a training run keeps its checkpoint: shared by ``coopnets push``, ``coopnets export`` and ``hub/publish.py``."""
from __future__ import annotations

from pathlib import Path
from typing import Union

from ..hub import CONFIG_NAME, CheckpointError


def checkpoint_folder(path: Union[str, Path]) -> Path:
    """The checkpoint folder of a run: ``RUN_DIR/model``, or ``RUN_DIR`` itself if it is one.

    A run folder holds the run's own ``config.json`` (its :class:`~coopnets.train.TrainConfig`)
    beside ``model/``, so ``model/`` is looked at first.

    Example:
        >>> import tempfile
        >>> run = Path(tempfile.mkdtemp())
        >>> (run / "model").mkdir(); _ = (run / "model" / CONFIG_NAME).write_text("{}")
        >>> checkpoint_folder(run) == run / "model", checkpoint_folder(run / "model") == run / "model"
        (True, True)
    """
    run_dir = Path(path)
    if not run_dir.exists():
        raise CheckpointError(f"{run_dir} does not exist: give a training run folder (RUN_DIR with model/) or a checkpoint folder.")
    if not run_dir.is_dir():
        raise CheckpointError(
            f"{run_dir} is a file, not a checkpoint: give a training run folder (RUN_DIR with model/) or a "
            f"checkpoint folder holding {CONFIG_NAME} and model.safetensors."
        )
    for folder in (run_dir / "model", run_dir):
        if (folder / CONFIG_NAME).is_file():
            return folder
    raise CheckpointError(
        f"no checkpoint in {run_dir}: expected {run_dir / 'model' / CONFIG_NAME}, written by "
        f"`coopnets train ... --out {run_dir}` (or by coopnets.save_pretrained(model, {run_dir / 'model'}))."
    )
