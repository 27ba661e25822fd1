"""The one training loop shared by every recipe.

:func:`train` builds the data (:mod:`.data`), the recipe (``--method``), timm's optimizer
and scheduler, then for every epoch: trains with a progress bar (loss, per-depth train
accuracy, rate, ETA), validates every depth of every ``recipe.eval_models()`` net,
appends a line to ``metrics.jsonl`` and writes the checkpoint ``last.pth`` atomically
(temp file + ``os.replace``) with recipe, optimizer, scheduler, AMP scaler, epoch and
the RNG states of torch, numpy and python, so ``resume=True`` continues bit-for-bit.

At the end (rank 0 only) the net chosen by ``recipe.deployable`` is scored on the test
split at every depth and profiled (:func:`coopnets.profile`); the per-depth table is
printed and written to ``results.md`` and ``results.png`` (accuracy vs FLOPs). The
deployable net goes to ``model/`` (safetensors), every other child of the recipe (the
other Teammate, the Leader...) to ``<name>.safetensors``.

Run folder::

    config.json  metrics.jsonl  last.pth  results.md  results.png  model/  <name>.safetensors

``method="independent"`` without a ``depth`` option trains one such run per depth in
``depth1/ .. depthD/`` and writes the combined ``results.md``/``results.png`` beside them
(:func:`train_each_depth`).

Example:
    >>> cfg = TrainConfig(out="/tmp/coopnets-doctest", model="test_resnet", method="multi_exit", epochs=1,
    ...                   img_size=16, limit_train=64, limit_eval=32, progress=False, profile_repeats=1)
    >>> import shutil; shutil.rmtree(cfg.out, ignore_errors=True)
    >>> summary = train(cfg, echo=False)
    >>> summary["deployable"], len(summary["test_accuracy"])
    ('net', 4)
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shlex
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from .._registry import create_model, is_model
from ..models.depth_adaptive import DepthAdaptiveModel, wrap
from ..pretrained import save_pretrained
from ..profiler import format_table, profile
from . import distributed as ddp
from .data import DataSplits, load_data
from .recipe import RECIPES, ModelFactory, Recipe, create_recipe

CHECKPOINT = "last.pth"


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


# --- reproducibility ------------------------------------------------------------------
def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def rng_state() -> Dict[str, Any]:
    """RNG states of torch (+CUDA), numpy and python as tensors/lists (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


# --- checkpoints ----------------------------------------------------------------------
def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file in the same folder, then ``os.replace``: never a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Load a checkpoint written by the trainer (``weights_only=True``: tensors and plain data only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def save_safetensors(module: nn.Module, path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(path))


def save_deployable(model: DepthAdaptiveModel, directory: Path, rows: List[Dict[str, Any]], info: Dict[str, Any]) -> None:
    """The deployable net as a pretrained folder (:func:`coopnets.save_pretrained`: safetensors, config, card)."""
    save_pretrained(model, directory, per_depth=rows, training=info)


# --- building blocks --------------------------------------------------------------------
def model_factory(name: str, num_classes: int, plan: str = "exits") -> ModelFactory:
    """A builder of fresh depth-adaptive nets: zoo names via the registry, other timm names wrapped.

    Example:
        >>> model_factory("test_resnet", 3)().num_depths
        4
    """
    if is_model(name):
        return lambda: create_model(name, num_classes=num_classes, plan=plan)
    return lambda: wrap(name, num_classes=num_classes, plan=plan)


def make_loader(ds: Dataset, batch_size: int, workers: int, sampler: Optional[DistributedSampler] = None) -> DataLoader:
    """Train loader when ``sampler`` is given (full batches only, order from the sampler), else an eval loader."""
    drop_last = sampler is not None and len(sampler) >= batch_size
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers, drop_last=drop_last)


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> List[float]:
    """Accuracy of every depth of ``model`` on ``loader`` (one shared pass per batch), shallowest first.

    A plain classifier (not a :class:`DepthAdaptiveModel`) counts as one depth.
    """
    was_training = model.training
    model.eval()
    adaptive = isinstance(model, DepthAdaptiveModel)
    correct = torch.zeros(model.num_depths if adaptive else 1, dtype=torch.long)
    total = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        for k, logits in enumerate(model.forward_exits(x) if adaptive else [model(x)]):
            correct[k] += int((logits.argmax(-1) == y).sum())
        total += len(y)
    model.train(was_training)
    return (correct.double() / max(total, 1)).tolist()


def prepare_run_dir(out: Path, resume: bool) -> Optional[Path]:
    """Check the run folder against ``resume``; return the checkpoint to resume from (if any)."""
    ckpt = out / CHECKPOINT
    if resume and not ckpt.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint {ckpt} to resume from.")
    if not resume and ckpt.exists():
        raise FileExistsError(f"{out} already holds a run ({ckpt}); pass --resume to continue it or choose another --out.")
    return ckpt if resume else None


# --- the loop -------------------------------------------------------------------------
class Trainer:
    """Runs one :class:`TrainConfig`: ``Trainer(cfg).fit()`` returns the run summary."""

    def __init__(self, cfg: TrainConfig, echo: bool = True) -> None:
        self.cfg = cfg
        self.dist = ddp.init_distributed(cfg.device)
        self.echo = echo and self.dist.is_main
        self.out = Path(cfg.out)
        resume_from = prepare_run_dir(self.out, cfg.resume)
        seed_everything(cfg.seed, cfg.deterministic)
        pretrained_cfg = None if cfg.data_dir is None else _pretrained_cfg(cfg.model)
        self.data: DataSplits = load_data(cfg.dataset, cfg.data_dir, cfg.img_size, pretrained_cfg).limited(
            cfg.limit_train, cfg.limit_eval
        )
        self.recipe: Recipe = create_recipe(
            cfg.method, model_factory(cfg.model, self.data.num_classes, cfg.plan), cfg.recipe_opts
        ).to(self.dist.device)
        self.optimizer = create_optimizer_v2(self.recipe, cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs
        )
        self.use_amp = cfg.amp and self.dist.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.sampler = DistributedSampler(
            self.data.train, num_replicas=self.dist.world_size, rank=self.dist.rank, shuffle=True, seed=cfg.seed
        )
        self.train_loader = make_loader(self.data.train, cfg.batch_size, cfg.workers, self.sampler)
        self.val_loader = make_loader(self.data.val, cfg.batch_size, cfg.workers)
        self.start_epoch, self.elapsed, self.val_acc = 0, 0.0, {}
        if resume_from is not None:
            self._restore(load_checkpoint(resume_from))
        self.model = self.recipe
        if self.dist.distributed:
            ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            self.model = DistributedDataParallel(
                self.recipe, device_ids=ids, find_unused_parameters=not self.recipe.trains_all_parameters
            )

    # --- state ----------------------------------------------------------------------
    def _state(self, epoch: int) -> Dict[str, Any]:
        return {
            "recipe": self.recipe.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": epoch, "elapsed_s": self.elapsed, "val_accuracy": self.val_acc, "rng": rng_state(),
        }

    def _restore(self, state: Dict[str, Any]) -> None:
        self.recipe.load_state_dict(state["recipe"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.elapsed, self.val_acc = state["epoch"], state["elapsed_s"], state["val_accuracy"]
        set_rng_state(state["rng"])
        if self.dist.is_main:
            _truncate_metrics(self.out / "metrics.jsonl", self.start_epoch)

    def log(self, text: str) -> None:
        if self.echo:
            tqdm.write(text)

    # --- epochs ---------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> Dict[str, Any]:
        """One pass over the train split; returns mean loss, per-depth accuracy and mean loss terms."""
        self.recipe.train()
        self.sampler.set_epoch(epoch)
        dev = self.dist.device
        sums: Optional[torch.Tensor] = None  # [loss*n, n, correct per depth..., term*n ...]
        names: List[str] = []
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", leave=False,
                   disable=not (self.cfg.progress and self.dist.is_main), dynamic_ncols=True)
        for x, y in bar:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            autocast = torch.autocast("cuda", dtype=torch.float16) if self.use_amp else nullcontext()
            with autocast:
                out = self.model(x, y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(out.loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            n = len(y)
            names = names or sorted(out.terms)
            row = torch.tensor(
                [out.loss.item() * n, n]
                + [float((z.argmax(-1) == y).sum()) for z in out.logits]
                + [out.terms[k] * n for k in names],
                dtype=torch.float64,
            )
            sums = row if sums is None else sums + row
            acc = sums[2:2 + len(out.logits)] / sums[1]
            bar.set_postfix_str(f"loss {sums[0] / sums[1]:.3f} acc " + "/".join(f"{a:.2f}" for a in acc.tolist()))
        assert sums is not None, "empty train loader"
        sums = ddp.all_sum(sums.to(dev)).cpu()
        depths = len(sums) - 2 - len(names)
        return {
            "train_loss": float(sums[0] / sums[1]),
            "train_accuracy": (sums[2:2 + depths] / sums[1]).tolist(),
            "terms": {k: float(v / sums[1]) for k, v in zip(names, sums[2 + depths:])},
        }

    def validate(self, loader: DataLoader) -> Dict[str, List[float]]:
        """Per-depth accuracy of every eval net on ``loader``."""
        return {name: evaluate(m, loader, self.dist.device) for name, m in self.recipe.eval_models().items()}

    def fit(self) -> Dict[str, Any]:
        """Train the remaining epochs, then write the final table and models. Returns the summary (rank 0)."""
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            _write_json(self.out / "config.json", {**dataclasses.asdict(self.cfg), "world_size": self.dist.world_size})
        for epoch in range(self.start_epoch, self.cfg.epochs):
            start = time.perf_counter()
            stats = self.train_epoch(epoch)
            self.scheduler.step(epoch + 1)
            ddp.sync_buffers(self.recipe)
            if self.dist.is_main:
                self.val_acc = self.validate(self.val_loader)
            self.elapsed += time.perf_counter() - start
            if self.dist.is_main:
                record = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"], **stats,
                          "val_accuracy": self.val_acc, "elapsed_s": self.elapsed}
                _append_jsonl(self.out / "metrics.jsonl", record)
                save_atomic(self._state(epoch + 1), self.out / CHECKPOINT)
                self.log(_epoch_line(record))
            ddp.barrier()
        summary = self.finish() if self.dist.is_main else {}
        ddp.barrier()
        return summary

    # --- the end ----------------------------------------------------------------------
    def finish(self) -> Dict[str, Any]:
        """Test every eval net, profile the deployable one, write table, plot and models."""
        nets = self.recipe.eval_models()
        best = self.recipe.deployable(self.val_acc)
        test_loader = make_loader(self.data.test, self.cfg.batch_size, self.cfg.workers)
        test = self.validate(test_loader)
        references = {name: evaluate(m, test_loader, self.dist.device)[0]
                      for name, m in self.recipe.reference_models().items()}
        rows = profile(nets[best], input_size=self.data.input_size, repeats=self.cfg.profile_repeats, print_table=False)
        for r in rows:
            r["accuracy"] = test[best][r["depth"] - 1]
            r.update({f"acc {name}": acc[r["depth"] - 1] for name, acc in test.items() if name != best})
        info = {"method": self.cfg.method, "model": self.cfg.model, "dataset": self.cfg.data_dir or self.cfg.dataset,
                "epochs": self.cfg.epochs, "seed": self.cfg.seed, "command": self.cfg.command(self.dist.world_size),
                "deployable": best, "wall_time_s": self.elapsed, "val_accuracy": self.val_acc, "test_accuracy": test}
        about = (f"Deployable net: **{best}** (best mean val accuracy over depths). `accuracy` is its test accuracy "
                 f"per depth; `acc NAME` columns are the other nets'.")
        if references:
            info["reference_test_accuracy"] = references
            about += " Plain networks trained in the same run, test accuracy: " + ", ".join(
                f"{name} {acc:.4f}" for name, acc in references.items()) + "."
        report = write_results(self.out, info, rows, about)
        save_deployable(nets[best], self.out / "model", rows, info)
        for name, child in self.recipe.named_children():
            if child is not nets[best]:
                save_safetensors(child, self.out / f"{name}.safetensors")
        _append_jsonl(self.out / "metrics.jsonl", {"final": True, **info, "per_depth": rows})
        self.log(report)
        return {**info, "per_depth": rows, "test_accuracy": test[best]}


def train(cfg: TrainConfig, echo: bool = True) -> Dict[str, Any]:
    """Run ``cfg`` to completion (see :class:`Trainer`); the summary is empty on ranks other than 0.

    A recipe whose options ask for one run per depth (``independent`` without a
    ``depth`` option, see :meth:`Recipe.runs_per_depth`) goes to :func:`train_each_depth`.
    """
    recipe_cls = RECIPES.get(cfg.method)
    if recipe_cls is not None and recipe_cls.runs_per_depth(cfg.recipe_opts):
        return train_each_depth(cfg, echo)
    return Trainer(cfg, echo=echo).fit()


def train_each_depth(cfg: TrainConfig, echo: bool = True) -> Dict[str, Any]:
    """One run per depth, in ``OUT/depth{d}``, each with the recipe option ``depth=d``.

    For ``independent`` this is the baseline: run ``d`` trains only the truncated network
    of depth ``d`` (its stem, stages and exit). Each run is a complete run folder of its
    own (checkpoint, metrics, ``model/``).
    ``OUT/results.md`` and ``results.png`` combine them: depth ``d``'s row comes from
    run ``d``; ``wall_time_s`` is the sum over runs, the cost of obtaining every depth.
    With ``resume=True`` finished runs are kept, an interrupted one continues from its
    checkpoint and missing ones start.

    Example:
        >>> cfg = TrainConfig(out="/tmp/coopnets-doctest-ind", model="test_resnet", method="independent", epochs=1,
        ...                   img_size=16, limit_train=64, limit_eval=32, progress=False, profile_repeats=1)
        >>> import shutil; shutil.rmtree(cfg.out, ignore_errors=True)
        >>> summary = train(cfg, echo=False)
        >>> len(summary["runs"]), len(summary["test_accuracy"])
        (4, 4)
    """
    out = Path(cfg.out)
    summaries: List[Dict[str, Any]] = []
    num_depths = 1
    while len(summaries) < num_depths:
        depth = len(summaries) + 1
        run_dir = out / f"depth{depth}"
        sub = dataclasses.replace(cfg, out=str(run_dir), recipe_opts={**cfg.recipe_opts, "depth": depth},
                                  resume=cfg.resume and (run_dir / CHECKPOINT).is_file())
        trainer = Trainer(sub, echo=echo)
        (net,) = trainer.recipe.eval_models().values()
        num_depths = net.num_depths
        trainer.log(f"{cfg.method}: run for depth {depth} of {num_depths} -> {run_dir}")
        summaries.append(trainer.fit())
    if not trainer.dist.is_main:
        return {}
    rows = [dict(s["per_depth"][d]) for d, s in enumerate(summaries)]
    accuracy = [r["accuracy"] for r in rows]
    info = {"method": cfg.method, "model": cfg.model, "dataset": cfg.data_dir or cfg.dataset, "epochs": cfg.epochs,
            "seed": cfg.seed, "command": cfg.command(trainer.dist.world_size), "deployable": None,
            "wall_time_s": sum(s["wall_time_s"] for s in summaries),
            "run_wall_time_s": [s["wall_time_s"] for s in summaries],
            "test_accuracy": {"each depth alone": accuracy},
            "runs": [str(out / f"depth{d}") for d in range(1, num_depths + 1)]}
    about = ("One run per depth (`depth{d}/`), each training only that depth's truncated network; `accuracy` at "
             "depth d is run d's test accuracy, the wall time is the sum over runs. Each run's own `model/` holds its "
             "weights.")
    trainer.log(write_results(out, info, rows, about))
    return {**info, "per_depth": rows, "test_accuracy": accuracy}


# --- outputs --------------------------------------------------------------------------
def _pretrained_cfg(model: str) -> Dict[str, Any]:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model)
    return cfg.to_dict() if cfg is not None else {}


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def _append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def _truncate_metrics(path: Path, epoch: int) -> None:
    """Drop ``metrics.jsonl`` lines past the checkpoint's ``epoch`` (written after it by an interrupted run)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if json.loads(line).get("epoch", epoch + 1) <= epoch]
        path.write_text("".join(line + "\n" for line in keep))


def _epoch_line(r: Mapping[str, Any]) -> str:
    val = "  ".join(f"{k}: " + "/".join(f"{a:.3f}" for a in v) for k, v in r["val_accuracy"].items())
    return f"epoch {r['epoch']}: loss {r['train_loss']:.4f}  val acc per depth  {val}  ({r['elapsed_s']:.0f}s)"


def write_results(out: Path, info: Mapping[str, Any], rows: List[Dict[str, Any]], about: str) -> str:
    """Write the per-depth table (``results.md``) and accuracy-vs-FLOPs plot (``results.png``); returns the report."""
    table = format_table(rows, extra=("accuracy", *[k for k in rows[0] if k.startswith("acc ")]))
    report = (
        f"# {info['method']} training of {info['model']} on {info['dataset']}\n\n"
        f"{info['epochs']} epochs, seed {info['seed']}, training wall time {info['wall_time_s']:.0f} s. {about}\n\n"
        f"{table}\n"
    )
    (out / "results.md").write_text(report)
    plot_accuracy_vs_flops(rows, info["test_accuracy"], info["deployable"], out / "results.png")
    return report


def plot_accuracy_vs_flops(
    rows: List[Dict[str, Any]], test: Mapping[str, List[float]], best: Optional[str], path: Path
) -> None:
    """Test accuracy against GFLOPs, one point per depth, one line per eval net (``best`` drawn as deployed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flops = [r["flops"] / 1e9 for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, acc in test.items():
        ax.plot(flops, acc, "o-" if name == best else "s--", label=f"{name}{' (deployed)' if name == best else ''}")
        for d, (f, a) in enumerate(zip(flops, acc), 1):
            ax.annotate(str(d), (f, a), textcoords="offset points", xytext=(3, -10), fontsize=7)
    ax.set_xlabel("GFLOPs per image")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
