"""What a training run is asked to do: :class:`TrainConfig`, and the command line that reproduces it.

Example:
    >>> cfg = TrainConfig(out="runs/r18", epochs=3)
    >>> cfg.method, cfg.plan, cfg.command().split()[:4]
    ('cooperative', 'exits', ['coopnets', 'train', '--out', 'runs/r18'])
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from .best import EVAL_METRICS
from .fields import field_problems

#: fields a ``--resume`` may change: they do not alter what the run computes (``epochs``
#: only extends or shortens the schedule; the others are where/how fast it runs and what
#: it prints). Everything else (model, data, optimiser, seed, recipe...) would make the
#: resumed run a different run than its checkpoint's.
#: ``out`` too: a run is identified by its folder, not by the path string that names it (a run folder
#: that was moved, copied or is named by a relative path resumes; its config.json then records the new place).
RESUME_MAY_CHANGE = frozenset({"epochs", "workers", "progress", "device", "profile_repeats", "resume", "torchcompile",
                               "out", "log_wandb", "experiment", "wandb_project", "wandb_tags"})
#: fields that name a path: equal when they name the same existing file or folder
PATH_FIELDS = ("data_dir", "initial_checkpoint", "class_map")

#: timm train.py's ``--clip-mode`` choices and the AMP dtypes
CLIP_MODES = ("norm", "value", "agc")
AMP_DTYPES = ("float16", "bfloat16")
#: timm's ``--mixup-mode``, ``--remode`` and ``--lr-base-scale`` choices
MIXUP_MODES = ("batch", "pair", "elem")
RE_MODES = ("const", "rand", "pixel")
LR_BASE_SCALES = ("", "linear", "sqrt")


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
        train_subset: train on a stratified random subset of this many train images, drawn
            with ``seed`` and repeated to keep the epoch length (:meth:`DataSplits.train_subset`);
            val and test stay whole. For studies of scarce data.
        pretrained: start the backbone(s) from timm's pretrained weights (``--pretrained``).
        initial_checkpoint: a coopnets checkpoint (``local-dir:``/``hf-hub:`` or a folder) to start from.
        num_classes: classes of the nets (None: the dataset's); classifiers are re-initialised
            when a start checkpoint has another number.
        model_kwargs: extra ``timm.create_model`` keyword arguments (``drop_path_rate``...).
        momentum, clip_grad, clip_mode, min_lr, warmup_lr, decay_epochs, decay_rate,
            layer_decay, smoothing, mixup, cutmix, grad_accum_steps, channels_last,
            amp_dtype, model_ema, model_ema_decay, model_ema_warmup, torchcompile, sync_bn,
            checkpoint_hist, eval_metric: as timm's ``train.py`` options of the same names
            (``checkpoint_hist``: best epochs kept, the best one is published; 0: the last
            epoch is; ``eval_metric``: a key of :data:`~coopnets.train.best.EVAL_METRICS`).
        drop ... experiment (the fields after ``eval_metric``): timm ``train.py``'s flags of the same
            names and meanings, each handed to timm's own implementation (:mod:`coopnets.train.timm_flags`).
            ``None`` leaves the model's or the data's own value. Defaults are timm's, except where timm's would
            change what a run without the flag computed: ``drop`` (timm 0.0, here the model's own),
            ``train_interpolation`` (timm ``random``, here the data config's) and ``val_split`` (timm
            ``validation``, here ``val``). ``lr=None`` takes timm's ``lr_base`` rule
            (:func:`~coopnets.train.timm_flags.resolve_lr`); the CLI sets it when ``--lr-base`` is given
            without ``--lr``. ``experiment`` names the run (its wandb run; the CLI's default ``--out`` is
            ``runs/<experiment>``).
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
    lr: Optional[float] = 0.05
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
    train_subset: Optional[int] = None
    pretrained: bool = False
    initial_checkpoint: Optional[str] = None
    num_classes: Optional[int] = None
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    momentum: float = 0.9
    clip_grad: Optional[float] = None
    clip_mode: str = "norm"
    min_lr: float = 0.0
    warmup_lr: float = 1e-5
    decay_epochs: float = 90.0
    decay_rate: float = 0.1
    layer_decay: Optional[float] = None
    smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    grad_accum_steps: int = 1
    channels_last: bool = False
    amp_dtype: str = "float16"
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    model_ema_warmup: bool = False
    torchcompile: Optional[str] = None
    sync_bn: bool = False
    checkpoint_hist: int = 1
    eval_metric: str = "mean_accuracy"
    drop: Optional[float] = None
    drop_path: Optional[float] = None
    drop_block: Optional[float] = None
    bn_momentum: Optional[float] = None
    bn_eps: Optional[float] = None
    aa: Optional[str] = None
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: List[float] = field(default_factory=lambda: [3.0 / 4.0, 4.0 / 3.0])
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: float = 0.4
    train_interpolation: Optional[str] = None
    no_aug: bool = False
    aug_repeats: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    mixup_off_epoch: int = 0
    cutmix_minmax: Optional[List[float]] = None
    opt_eps: Optional[float] = None
    opt_betas: Optional[List[float]] = None
    opt_kwargs: Dict[str, Any] = field(default_factory=dict)
    lr_base: float = 0.1
    lr_base_size: int = 256
    lr_base_scale: str = ""
    cooldown_epochs: int = 0
    sched_on_updates: bool = False
    input_size: Optional[List[int]] = None
    crop_pct: Optional[float] = None
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    interpolation: Optional[str] = None
    train_split: str = "train"
    val_split: str = "val"
    class_map: Optional[str] = None
    in_chans: Optional[int] = None
    gp: Optional[str] = None
    grad_checkpointing: bool = False
    head_init_scale: Optional[float] = None
    log_wandb: bool = False
    experiment: Optional[str] = None
    wandb_project: Optional[str] = None
    wandb_tags: Optional[List[str]] = None

    def type_problems(self) -> List[str]:
        """One sentence per field whose value is not of its declared type (``--epochs must be an int (got 'ten')``)."""
        return field_problems(TrainConfig, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, _flag)

    def problems(self) -> List[str]:
        """Every value of the wrong type or out of range, one sentence each (types first: the range
        checks compare numbers). Names that must be one of a set and the options of a recipe or a
        model are :func:`coopnets.train.checks.config_problems`' (they need the registries)."""
        types = self.type_problems()
        if types:
            return types
        problems: List[str] = []

        def need(name: str, ok: bool, rule: str) -> None:
            if not ok:
                problems.append(f"--{name.replace('_', '-')} must be {rule} (got {getattr(self, name)})")

        for name in ("epochs", "img_size", "batch_size", "profile_repeats", "grad_accum_steps"):
            need(name, getattr(self, name) > 0, "> 0")
        need("lr", self.lr is None or (self.lr >= 0 and math.isfinite(self.lr)), ">= 0")
        for name in ("weight_decay", "warmup_epochs", "workers", "min_lr", "warmup_lr", "momentum",
                     "smoothing", "mixup", "cutmix", "decay_rate"):
            value = getattr(self, name)
            need(name, value >= 0 and math.isfinite(value), ">= 0")
        for name in ("limit_train", "limit_eval", "train_subset", "num_classes", "clip_grad", "layer_decay"):
            value = getattr(self, name)
            need(name, value is None or value > 0, "> 0")
        need("smoothing", self.smoothing < 1, "< 1")
        need("decay_epochs", self.decay_epochs > 0, "> 0")
        need("clip_mode", self.clip_mode in CLIP_MODES, f"one of {', '.join(CLIP_MODES)}")
        need("amp_dtype", self.amp_dtype in AMP_DTYPES, f"one of {', '.join(AMP_DTYPES)}")
        need("model_ema_decay", 0 < self.model_ema_decay < 1, "in (0, 1)")
        need("checkpoint_hist", self.checkpoint_hist >= 0, ">= 0")
        need("eval_metric", self.eval_metric in EVAL_METRICS, f"one of {', '.join(EVAL_METRICS)}")
        if self.torchcompile is not None:
            import torch._dynamo

            backends = torch._dynamo.list_backends(exclude_tags=())
            need("torchcompile", self.torchcompile in backends, f"one of {', '.join(backends)}")
        if (self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None) and self.batch_size % 2:
            problems.append(f"--batch-size must be even with --mixup/--cutmix (got {self.batch_size})")
        return problems + self._timm_flag_problems()

    def _timm_flag_problems(self) -> List[str]:
        """Out-of-range values of timm ``train.py``'s flags (what timm's own code would assert on or misuse)."""
        problems: List[str] = []

        def need(name: str, ok: bool, rule: str) -> None:
            if not ok:
                problems.append(f"{_flag(name)} must be {rule} (got {getattr(self, name)})")

        for name in ("drop", "drop_path", "drop_block", "bn_momentum"):
            need(name, getattr(self, name) is None or 0 <= getattr(self, name) <= 1, "in [0, 1]")
        for name in ("reprob", "hflip", "vflip", "mixup_prob", "mixup_switch_prob"):
            need(name, 0 <= getattr(self, name) <= 1, "in [0, 1]")
        for name in ("bn_eps", "opt_eps", "crop_pct", "in_chans"):
            need(name, getattr(self, name) is None or getattr(self, name) > 0, "> 0")
        for name in ("color_jitter", "aug_repeats", "mixup_off_epoch", "cooldown_epochs"):
            need(name, getattr(self, name) >= 0, ">= 0")
        for name in ("lr_base", "lr_base_size", "recount"):
            need(name, getattr(self, name) > 0, "> 0")
        for name, choices in (("remode", RE_MODES), ("mixup_mode", MIXUP_MODES), ("lr_base_scale", LR_BASE_SCALES)):
            need(name, getattr(self, name) in choices, "one of " + ", ".join(repr(c) for c in choices))
        for name, n, rule in (("scale", 2, "2 numbers 0 < min <= max"), ("ratio", 2, "2 numbers 0 < min <= max"),
                              ("cutmix_minmax", 2, "2 numbers 0 < min <= max <= 1"), ("input_size", 3, "3 ints > 0 (C H W)")):
            value = getattr(self, name)
            need(name, value is None or (len(value) == n and min(value) > 0 and (n == 3 or value[0] <= value[1])
                                         and (name != "cutmix_minmax" or value[1] <= 1)), rule)
        if self.opt_betas is not None:
            need("opt_betas", len(self.opt_betas) > 0 and all(0 <= b < 1 for b in self.opt_betas), "numbers in [0, 1)")
        sizes = self.input_size if self.input_size and len(self.input_size) == 3 else None
        if self.in_chans is not None and sizes and self.in_chans != sizes[0]:
            problems.append(f"--in-chans {self.in_chans} and --input-size {' '.join(map(str, sizes))} name different "
                            f"channels; give one")
        chans = self.in_chans or (sizes[0] if sizes else 3)
        for name in ("mean", "std"):
            value = getattr(self, name)
            need(name, value is None or (len(value) in (1, chans) and (name == "mean" or min(value) > 0)),
                 f"1 or {chans} values (one per input channel){', > 0' if name == 'std' else ''}")
        return problems

    def check(self) -> None:
        """Raise ``ValueError`` (one line, every problem) when a value is of the wrong type or out of range.

        Called before a run touches its folder (with the rest of :func:`coopnets.train.checks.check_config`).

        Example:
            >>> TrainConfig(epochs=0, lr=-1).check()
            Traceback (most recent call last):
            ...
            ValueError: invalid settings: --epochs must be > 0 (got 0); --lr must be >= 0 (got -1)
            >>> TrainConfig(epochs="ten").check()
            Traceback (most recent call last):
            ...
            ValueError: invalid settings: --epochs must be an int (got 'ten')
        """
        problems = self.problems()
        if problems:
            raise ValueError("invalid settings: " + "; ".join(problems))

    def differences(self, saved: Mapping[str, Any]) -> List[str]:
        """Fields (as flags) where this config differs from a saved ``config.json``, ignoring
        :data:`RESUME_MAY_CHANGE`. Fields the saved file lacks (older runs) count as their defaults.

        Example:
            >>> TrainConfig(lr=0.1, epochs=5).differences({"lr": 0.05, "epochs": 3})
            ['--lr 0.1 (saved 0.05)']
        """
        mine = json.loads(json.dumps(dataclasses.asdict(self)))
        default = json.loads(json.dumps(dataclasses.asdict(TrainConfig())))
        out: List[str] = []
        for name, value in mine.items():
            if name in RESUME_MAY_CHANGE:
                continue
            before = saved.get(name, default[name])
            if value != before and not (name in PATH_FIELDS and _same_path(value, before)):
                out.append(f"--{name.replace('_', '-')} {value} (saved {before})")
        return out

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
        always = {"model", "method", "img_size", "epochs", "seed", "dataset" if self.data_dir is None else "data_dir",
                  *(("lr_base",) if self.lr is None else ())}  # no --lr: the lr comes from --lr-base
        flags: List[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if (value == getattr(default, f.name) and f.name not in always) or value is None \
                    or f.name in ("recipe_opts", "model_kwargs", "opt_kwargs", "resume"):
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                flags.append(flag if value else f"--no-{f.name}")
            elif isinstance(value, (list, tuple)):  # nargs flags (--scale 0.5 1.0, --mean ...)
                flags += [flag, *(shlex.quote(str(v)) for v in value)]
            else:
                flags += [flag, shlex.quote(str(value))]
        for key, value in self.recipe_opts.items():  # strings as they are, other values as Python literals
            flags += ["--recipe-opt", shlex.quote(f"{key}={value if isinstance(value, str) else repr(value)}")]
        for option, values in (("--model-kwargs", self.model_kwargs), ("--opt-kwargs", self.opt_kwargs)):
            for key, value in values.items():
                flags += [option, shlex.quote(f"{key}={value if isinstance(value, str) else repr(value)}")]
        launcher = "coopnets train" if world_size == 1 else f"torchrun --nproc_per_node={world_size} -m coopnets.train"
        return " ".join([launcher, *flags])


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _same_path(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` name one existing file or folder (``local-dir:`` prefixes ignored).

    Example:
        >>> import tempfile; folder = tempfile.mkdtemp()
        >>> _same_path(folder, "local-dir:" + folder + "/."), _same_path(folder, None)
        (True, False)
    """
    paths = [str(p)[len("local-dir:"):] if str(p).startswith("local-dir:") else str(p) for p in (a, b) if p]
    try:
        return len(paths) == 2 and os.path.samefile(*paths)
    except OSError:
        return False
