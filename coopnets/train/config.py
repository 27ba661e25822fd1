"""What a training run is asked to do: :class:`TrainConfig`, and the command line that reproduces it.

Example:
    >>> cfg = TrainConfig(out="runs/r18", epochs=3)
    >>> cfg.method, cfg.plan, cfg.command().split()[:4]
    ('cooperative', 'exits', ['coopnets', 'train', '--out', 'runs/r18'])
"""
from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class TrainConfig:
    """Everything a training run needs; the CLI maps its flags onto these fields.

    Attributes:
        out: run folder. model: zoo name (``coop_resnet18``) or any timm backbone.
        method: recipe name. dataset / data_dir: ``digits`` or an ImageFolder tree.
        img_size: input side. plan: depth plan (``exits`` / ``blocks``).
        epochs, batch_size (per process), lr, opt, weight_decay, sched, warmup_epochs:
            optimisation (timm factories). seed / deterministic: reproducibility.
        amp: mixed precision where supported (CUDA only). resume: continue ``last.pth``.
        recipe_opts: overrides of the recipe's config. limit_train / limit_eval: use the
            first N samples (smoke tests). workers: DataLoader workers. device: force a
            device. profile_repeats: timed passes per depth in the final table.
        progress: show progress bars.
    """

    out: str = "runs/default"
    model: str = "coop_resnet18"
    method: str = "cooperative"
    dataset: str = "digits"
    data_dir: Optional[str] = None
    img_size: int = 32
    plan: str = "exits"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    opt: str = "sgd"
    weight_decay: float = 5e-4
    sched: str = "cosine"
    warmup_epochs: int = 0
    seed: int = 0
    deterministic: bool = False
    amp: bool = True
    resume: bool = False
    recipe_opts: Dict[str, Any] = field(default_factory=dict)
    limit_train: Optional[int] = None
    limit_eval: Optional[int] = None
    workers: int = 0
    device: Optional[str] = None
    profile_repeats: int = 10
    progress: bool = True

    def command(self, world_size: int = 1) -> str:
        """The ``coopnets train`` command line that reproduces this config, without ``--resume``.

        Model, method, data, epochs, input size and seed are always spelled out; other
        fields only where they differ from the defaults. Recorded in every checkpoint's
        training record, so a published model says how it was made.

        Example:
            >>> TrainConfig(out="runs/r18", epochs=3, recipe_opts={"leader": "resnet50"}).command()
            'coopnets train --out runs/r18 --model coop_resnet18 --method cooperative --dataset digits --img-size 32 --epochs 3 --seed 0 --recipe-opt leader=resnet50'
        """
        default = TrainConfig()
        always = {"model", "method", "img_size", "epochs", "seed", "dataset" if self.data_dir is None else "data_dir"}
        flags: List[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if (value == getattr(default, f.name) and f.name not in always) or f.name in ("recipe_opts", "resume"):
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                flags.append(flag if value else f"--no-{f.name}")
            else:
                flags += [flag, shlex.quote(str(value))]
        for key, value in self.recipe_opts.items():  # strings as they are, other values as Python literals
            flags += ["--recipe-opt", shlex.quote(f"{key}={value if isinstance(value, str) else repr(value)}")]
        launcher = "coopnets train" if world_size == 1 else f"torchrun --nproc_per_node={world_size} -m coopnets.train"
        return " ".join([launcher, *flags])
