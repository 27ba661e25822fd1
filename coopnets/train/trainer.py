"""The one training loop shared by every recipe.

:class:`Trainer` builds the data (:mod:`.data`), the recipe (``--method``), timm's optimizer
and scheduler (:mod:`.build`), then for every epoch: trains with a progress bar (loss,
per-depth train accuracy, rate, ETA), validates every depth of every
``recipe.eval_models()`` net, appends a line to ``metrics.jsonl`` (:mod:`.report`) and
writes the checkpoint ``last.pth`` atomically (:mod:`.state`) with recipe, optimizer,
scheduler, AMP scaler, epoch and the RNG states of torch, numpy and python, so
``resume=True`` continues bit-for-bit.

Options of timm's ``train.py`` live here too: ``model_ema`` keeps timm's ``ModelEmaV3`` of
the whole recipe, validated at every depth beside the trained nets (``<net>_ema``; with EMA
the deployable net is chosen among the EMA nets, as timm selects on EMA metrics);
``torchcompile`` compiles the training step (the recipe's forward with its loss);
``sync_bn`` converts BatchNorm to SyncBatchNorm under DDP on CUDA; ``checkpoint_hist``
keeps the best epochs by ``eval_metric`` (:mod:`.best`). timm's other flags reach timm through
:mod:`.timm_flags` (the loop steps the schedule per update, turns mixup off at ``mixup_off_epoch``,
trains timm's cooldown epochs) and ``--log-wandb`` logs every epoch (:mod:`.tracking`).

At the end (rank 0 only) the best kept epoch's weights are restored (the last epoch's
with ``checkpoint_hist=0``) and the net chosen by ``recipe.deployable`` is scored on the test
split at every depth and profiled (:func:`coopnets.profile`); the per-depth table (test
``accuracy`` and, from that epoch's validation, ``val_accuracy``: what serving trades depths by) is
printed and written to ``results.md`` and ``results.png`` (accuracy vs FLOPs). The
deployable net goes to ``model/`` (safetensors), every other child of the recipe (the
other Teammate, the Leader...) to ``<name>.safetensors``.

Run folder::

    config.json  metrics.jsonl  last.pth  best-<epoch>.pth  results.md  results.png  model/  <name>.safetensors

A run folder belongs to its run (:mod:`.folder`): a folder holding anything else is refused,
and rank 0 holds an OS-level lock (``.coopnets-run.lock``) from the checks to the end of
:meth:`Trainer.fit`, so a second writer or resume is refused at once with the holder's pid.

``method="independent"`` without a ``depth`` option trains one such run per depth in
``depth1/ .. depthD/`` and writes the combined ``results.md``/``results.png`` beside them
(:func:`coopnets.train.sweep.train_each_depth`).

Example:
    >>> cfg = TrainConfig(out="/tmp/coopnets-doctest", model="test_resnet", method="multi_exit", epochs=1,
    ...                   img_size=16, limit_train=64, limit_eval=32, progress=False, profile_repeats=1)
    >>> import shutil; shutil.rmtree(cfg.out, ignore_errors=True)
    >>> summary = Trainer(cfg, echo=False).fit()
    >>> summary["deployable"], len(summary["test_accuracy"])
    ('net', 4)
"""
from __future__ import annotations

import dataclasses
import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from timm.data.mixup import Mixup, mixup_target
from timm.utils import ModelEmaV3, dispatch_clip_grad
from tqdm.auto import tqdm

from ..hub import save_pretrained, write_safetensors
from ..inference.profiler import profile
from ..models import DepthAdaptiveModel, eval_mode
from . import distributed as ddp
from .best import BestEpochs, score_of
from .build import create_optimization, make_loader, model_factory, timm_pretrained_cfg
from .timm_flags import backbone_kwargs, create_mixup, data_options, model_img_size, prepare_nets, train_sampler
from .tracking import Tracker, start_tracking
from .checks import check_config
from .config import TrainConfig
from .data import DataSplits, load_data
from .recipe import Recipe, RecipeOutput, create_recipe
from .report import METRICS, append_jsonl, epoch_line, truncate_metrics, write_json, write_results
from .folder import RunLock, check_claimable, check_owned
from .state import (CHECKPOINT, CheckpointReadError, load_checkpoint, prepare_run_dir, rng_state, save_atomic,
                    seed_everything, set_rng_state)

#: the run's settings, in its run folder
CONFIG = "config.json"
#: suffix of the EMA copies' names among the validated nets
EMA = "_ema"


def check_resume(cfg: TrainConfig, out: Path, world_size: int = 1) -> None:
    """Refuse (``ValueError``, one line) a resume whose settings differ from ``out/config.json``.

    Only :data:`~coopnets.train.config.RESUME_MAY_CHANGE` may change; the world size may
    not either (``batch_size`` is per process, so it would change the global batch).
    A run folder without ``config.json`` (older runs) is not checked here.
    """
    path = out / CONFIG
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--resume: cannot read {path} ({e}); restore it or start a new run with another --out.") from None
    diffs = cfg.differences(saved)
    if saved.get("world_size", world_size) != world_size:
        diffs.append(f"world size {world_size} (saved {saved['world_size']})")
    if diffs:
        raise ValueError(f"--resume: settings differ from {path}: {'; '.join(diffs)}. Only --epochs, --workers, "
                         f"--no-progress, --device and --profile-repeats may change on resume; repeat the run's "
                         f"command ({path} 'command') or start a new run with another --out.")


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> List[float]:
    """Accuracy of every depth of ``model`` on ``loader`` (one shared pass per batch), shallowest first.

    A plain classifier (not a :class:`DepthAdaptiveModel`) counts as one depth. The
    model runs in eval mode; its train/eval flags are restored afterwards.
    """
    adaptive = isinstance(model, DepthAdaptiveModel)
    correct = torch.zeros(model.num_depths if adaptive else 1, dtype=torch.long)
    total = 0
    with eval_mode(model):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            for k, logits in enumerate(model.forward_exits(x) if adaptive else [model(x)]):
                correct[k] += int((logits.argmax(-1) == y).sum())
            total += len(y)
    return (correct.double() / max(total, 1)).tolist()


class Trainer:
    """Runs one :class:`TrainConfig`: ``Trainer(cfg).fit()`` returns the run summary."""

    def __init__(self, cfg: TrainConfig, echo: bool = True) -> None:
        self.cfg = cfg
        check_config(cfg)
        self.dist = ddp.init_distributed(cfg.device)
        self.echo = echo and self.dist.is_main
        self.out = Path(cfg.out)
        # not another folder's, not held by a running run (rank 0, the writer, asks): nothing written yet
        if self.dist.is_main:
            check_claimable(self.out)
        else:
            check_owned(self.out)
        resume_from = prepare_run_dir(self.out, cfg.resume)
        saved: Optional[Dict[str, Any]] = None
        if resume_from is not None:
            check_resume(cfg, self.out, self.dist.world_size)
            saved = load_checkpoint(resume_from)
        self.lock: Optional[RunLock] = RunLock.acquire(self.out) if self.dist.is_main else None  # rank 0 writes
        try:
            self._build(cfg, resume_from, saved)
        except BaseException:
            self.release(failed=True)
            raise

    def release(self, failed: bool = False) -> None:
        """End this run's hold on its folder (:class:`~coopnets.train.folder.RunLock`); ``fit`` does it at the end."""
        if self.lock is not None:
            self.lock.release(failed)
            self.lock = None

    def _build(self, cfg: TrainConfig, resume_from: Optional[Path], saved: Optional[Dict[str, Any]]) -> None:
        """Everything a run is made of, from data to optimizer; a failure here leaves the folder as it was."""
        seed_everything(cfg.seed, cfg.deterministic)
        pretrained_cfg = None if cfg.data_dir is None else timm_pretrained_cfg(cfg.model)
        self.data: DataSplits = load_data(cfg.dataset, cfg.data_dir, cfg.img_size, pretrained_cfg,
                                          options=data_options(cfg)).limited(cfg.limit_train, cfg.limit_eval)
        if cfg.train_subset is not None:
            self.data = self.data.train_subset(cfg.train_subset, cfg.seed)
        if self.dist.is_main:
            self.data.warn_if_misleading()
        num_classes = cfg.num_classes or self.data.num_classes
        if num_classes < self.data.num_classes:
            raise ValueError(f"--num-classes {num_classes} is below the dataset's {self.data.num_classes} classes.")
        factory = model_factory(cfg.model, num_classes, cfg.plan, pretrained=cfg.pretrained,
                                model_kwargs={**backbone_kwargs(cfg), **cfg.model_kwargs}, img_size=model_img_size(cfg),
                                initial_checkpoint=cfg.initial_checkpoint)
        self.recipe: Recipe = create_recipe(cfg.method, factory, cfg.recipe_opts).to(self.dist.device)
        prepare_nets(self.recipe, cfg)  # --head-init-scale, --grad-checkpointing, --bn-momentum
        if cfg.sync_bn and self.dist.distributed:
            if self.dist.device.type != "cuda":
                raise ValueError("--sync-bn needs CUDA devices (SyncBatchNorm has no CPU kernel); drop it for "
                                 "gloo/CPU runs.")
            self.recipe = nn.SyncBatchNorm.convert_sync_batchnorm(self.recipe)
        if cfg.channels_last:
            self.recipe.to(memory_format=torch.channels_last)
        dev_type = self.dist.device.type
        self.amp_dtype = torch.bfloat16 if cfg.amp_dtype == "bfloat16" else torch.float16
        # float16 autocast on CUDA only (as before); bfloat16 wherever autocast supports it (CUDA, CPU)
        self.use_amp = cfg.amp and (dev_type == "cuda" or (self.amp_dtype == torch.bfloat16 and dev_type == "cpu"))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and dev_type == "cuda"
                                           and self.amp_dtype == torch.float16)
        self.num_classes = num_classes
        self.mixup: Optional[Mixup] = create_mixup(cfg, num_classes)
        self.sampler = train_sampler(self.data.train, cfg, self.dist.world_size, self.dist.rank)
        self.train_loader = make_loader(self.data.train, cfg.batch_size, cfg.workers, self.sampler)
        self.optimizer, self.scheduler, self.num_epochs = create_optimization(  # num_epochs: with timm's cooldown
            self.recipe, cfg, self.dist.world_size, -(-len(self.train_loader) // cfg.grad_accum_steps))
        self.tracker: Tracker = Tracker()  # --log-wandb: started with the run (fit)
        self.val_loader = make_loader(self.data.val, cfg.batch_size, cfg.workers)
        self.ema: Optional[ModelEmaV3] = None
        if cfg.model_ema:
            self.ema = ModelEmaV3(self.recipe, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup)
        self.updates = 0  # optimizer steps so far (EMA warmup)
        self.best = BestEpochs(self.out, cfg.checkpoint_hist)
        self.start_epoch, self.elapsed, self.val_acc = 0, 0.0, {}
        if saved is not None:
            self._restore(saved, resume_from)
        self.model = self.recipe
        if self.dist.distributed:
            ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            self.model = DistributedDataParallel(
                self.recipe, device_ids=ids, find_unused_parameters=not self.recipe.trains_all_parameters
            )
        if cfg.torchcompile:
            self.model = torch.compile(self.model, backend=cfg.torchcompile)

    # --- state ----------------------------------------------------------------------
    def _weights(self) -> Dict[str, Any]:
        """What a kept best epoch stores: the nets' weights (recipe and EMA) and their val accuracy."""
        return {"recipe": self.recipe.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
                "val_accuracy": self.val_acc}

    def _state(self, epoch: int) -> Dict[str, Any]:
        """``last.pth``: the weights plus everything a resume needs (optimizer, schedule, RNG, best-epoch ledger)."""
        return {
            **self._weights(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "epoch": epoch, "elapsed_s": self.elapsed, "rng": rng_state(), "updates": self.updates,
            "best": [list(kept) for kept in self.best.ledger],
        }

    def _restore(self, state: Dict[str, Any], path: Path) -> None:
        try:
            self.recipe.load_state_dict(state["recipe"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None:  # --sched none: no schedule, nothing to restore
                self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"] or {})
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointReadError(f"{path} does not fit this run's nets or optimizer ({first[:200]}); resume "
                                      f"with the run's own settings or start a new run with another --out.") from None
        self.start_epoch, self.elapsed, self.val_acc = state["epoch"], state["elapsed_s"], state["val_accuracy"]
        self.updates = state.get("updates", 0)
        self.best = BestEpochs(self.out, self.cfg.checkpoint_hist, state.get("best", ()))
        set_rng_state(state["rng"])
        if self.dist.is_main:
            truncate_metrics(self.out / METRICS, self.start_epoch)

    def log(self, text: str) -> None:
        if self.echo:
            tqdm.write(text)

    # --- epochs ---------------------------------------------------------------------
    def _targets(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        """Inputs and training targets: timm's Mixup/CutMix (soft targets), label smoothing as
        soft targets, else the integer labels."""
        if self.mixup is not None:
            return self.mixup(x, y)
        if self.cfg.smoothing > 0:
            return x, mixup_target(y, self.num_classes, smoothing=self.cfg.smoothing)
        return x, y

    def train_step(self, x: torch.Tensor, target: torch.Tensor, update: bool = True) -> RecipeOutput:
        """Forward/backward on a batch (mixed precision when enabled; loss divided by
        ``grad_accum_steps``); with ``update`` also clip and step. Returns the recipe's output.

        ``x`` goes channels-last here when the run asks for it, so a caller timing or driving
        single steps gets exactly the loop's step."""
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast(self.dist.device.type, dtype=self.amp_dtype) if self.use_amp else nullcontext()
        with autocast:
            out = self.model(x, target)
        self.scaler.scale(out.loss / self.cfg.grad_accum_steps).backward()
        if update:
            if self.cfg.clip_grad is not None:
                self.scaler.unscale_(self.optimizer)
                dispatch_clip_grad([p for p in self.recipe.parameters() if p.requires_grad],
                                   self.cfg.clip_grad, mode=self.cfg.clip_mode)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.updates += 1
            if self.scheduler is not None:  # --sched none: timm's None, the optimizer's lr is left as it is
                self.scheduler.step_update(num_updates=self.updates)  # acts with --sched-on-updates only (timm's)
            if self.ema is not None:
                self.ema.update(self.recipe, step=self.updates)
        return out

    def train_epoch(self, epoch: int) -> Dict[str, Any]:
        """One pass over the train split; returns mean loss, per-depth accuracy and mean loss terms."""
        self.recipe.train()
        self.sampler.set_epoch(epoch)
        if self.mixup is not None:  # --mixup-off-epoch: timm's mixup_enabled off from that epoch on
            self.mixup.mixup_enabled = not (self.cfg.mixup_off_epoch and epoch >= self.cfg.mixup_off_epoch)
        dev = self.dist.device
        sums: Optional[torch.Tensor] = None  # [loss*n, n, correct per depth..., term*n ...]
        names: List[str] = []
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{self.num_epochs}", leave=False,
                   disable=not (self.cfg.progress and self.dist.is_main), dynamic_ncols=True)
        self.optimizer.zero_grad(set_to_none=True)
        last = len(self.train_loader) - 1
        for i, (x, y) in enumerate(bar):
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            x, target = self._targets(x, y)
            out = self.train_step(x, target, update=(i + 1) % self.cfg.grad_accum_steps == 0 or i == last)
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

    def eval_nets(self) -> Dict[str, DepthAdaptiveModel]:
        """The nets validated every epoch: the recipe's eval nets, and their EMA copies as ``<name>_ema``."""
        nets = dict(self.recipe.eval_models())
        if self.ema is not None:
            nets.update({name + EMA: net for name, net in self.ema.module.eval_models().items()})
        return nets

    def deployable(self) -> str:
        """The net to deploy, by the recipe's rule on the validation accuracy; with EMA, among the EMA nets."""
        if self.ema is None:
            return self.recipe.deployable(self.val_acc)
        ema_acc = {name[:-len(EMA)]: acc for name, acc in self.val_acc.items() if name.endswith(EMA)}
        return self.ema.module.deployable(ema_acc) + EMA

    def validate(self, loader: DataLoader) -> Dict[str, List[float]]:
        """Per-depth accuracy of every eval net on ``loader``."""
        return {name: evaluate(m, loader, self.dist.device) for name, m in self.eval_nets().items()}

    def fit(self) -> Dict[str, Any]:
        """Train the remaining epochs, then write the final table and models. Returns the summary (rank 0).

        The run folder stays locked until this returns (or fails)."""
        try:
            summary = self._fit()
            self.tracker.close()
            return summary
        finally:
            self.tracker.close(failed=True)  # a no-op once closed
            self.release()

    def _fit(self) -> Dict[str, Any]:
        if self.dist.is_main:  # where the run lives now (a moved or copied run folder records its new place)
            write_json(self.out / CONFIG, {**dataclasses.asdict(self.cfg), "out": str(self.out.absolute()),
                                           "world_size": self.dist.world_size,
                                           "command": self.cfg.command(self.dist.world_size)})
        self.tracker = start_tracking(self.cfg, self.out, self.dist.world_size, self.dist.is_main)
        for epoch in range(self.start_epoch, self.num_epochs):
            start = time.perf_counter()
            stats = self.train_epoch(epoch)
            if self.scheduler is not None:
                self.scheduler.step(epoch + 1)
            ddp.sync_buffers(self.recipe)
            if self.dist.is_main:
                self.val_acc = self.validate(self.val_loader)
            self.elapsed += time.perf_counter() - start
            if self.dist.is_main:
                record = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"], **stats,
                          "val_accuracy": self.val_acc, "elapsed_s": self.elapsed}
                append_jsonl(self.out / METRICS, record)
                self.tracker.log(record)
                score = score_of(self.val_acc[self.deployable()], self.cfg.eval_metric)
                evicted = self.best.offer(score, epoch + 1, self._weights)
                save_atomic(self._state(epoch + 1), self.out / CHECKPOINT)
                self.best.remove(evicted)
                self.log(epoch_line(record))
            ddp.barrier()
        summary = self.finish() if self.dist.is_main else {}
        ddp.barrier()
        return summary

    # --- the end ----------------------------------------------------------------------
    def _restore_best(self) -> int:
        """Load the best kept epoch's weights and validation accuracy; returns the epoch the nets now hold."""
        epoch = self.best.best()
        if epoch is None:  # the nets hold the last epoch trained (or resumed, when none was left to train)
            return max(self.start_epoch, self.num_epochs)
        kept = self.best.load(epoch)
        self.recipe.load_state_dict(kept["recipe"])
        if self.ema is not None:
            self.ema.load_state_dict(kept["ema"])
        self.val_acc = kept["val_accuracy"]
        return epoch

    def finish(self) -> Dict[str, Any]:
        """Restore the best kept epoch, test every eval net, profile the deployable one, write table, plot and models."""
        epoch = self._restore_best()
        nets = self.eval_nets()
        best = self.deployable()
        test_loader = make_loader(self.data.test, self.cfg.batch_size, self.cfg.workers)
        test = self.validate(test_loader)
        references = {name: evaluate(m, test_loader, self.dist.device)[0]
                      for name, m in self.recipe.reference_models().items()}
        rows = profile(nets[best], input_size=self.data.input_size, repeats=self.cfg.profile_repeats, print_table=False)
        for r in rows:
            r["accuracy"] = test[best][r["depth"] - 1]
            r["val_accuracy"] = self.val_acc[best][r["depth"] - 1]  # the selected epoch's: what serving trades by
            r.update({f"acc {name}": acc[r["depth"] - 1] for name, acc in test.items() if name != best})
        info = {"method": self.cfg.method, "model": self.cfg.model, "dataset": self.cfg.data_dir or self.cfg.dataset,
                "epochs": self.cfg.epochs, "selected_epoch": epoch, "eval_metric": self.cfg.eval_metric,
                "seed": self.cfg.seed, "command": self.cfg.command(self.dist.world_size),
                "deployable": best, "wall_time_s": self.elapsed, "val_accuracy": self.val_acc, "test_accuracy": test,
                "test_split": self.data.test_split}
        about = (f"Deployable net: **{best}** (best mean val accuracy over depths), weights of epoch {epoch} "
                 f"(best val {self.cfg.eval_metric} of {self.cfg.checkpoint_hist} kept; 0: the last epoch). "
                 f"`accuracy` is its test accuracy per depth, `val_accuracy` its validation accuracy at that epoch (what "
                 f"`coopnets serve` trades depths by); `acc NAME` columns are the other nets' test accuracy.")
        if references:
            info["reference_test_accuracy"] = references
            about += " Plain networks trained in the same run, test accuracy: " + ", ".join(
                f"{name} {acc:.4f}" for name, acc in references.items()) + "."
        report = write_results(self.out, info, rows, about)
        save_pretrained(nets[best], self.out / "model", per_depth=rows, training=info,
                        data_config=self.data.pretrained_cfg_fields())
        for name, child in self.recipe.named_children():
            if child is not nets[best]:
                write_safetensors(child.state_dict(), self.out / f"{name}.safetensors")
        append_jsonl(self.out / METRICS, {"final": True, **info, "per_depth": rows})
        self.tracker.summary({"test_accuracy": test[best], "selected_epoch": epoch, "wall_time_s": self.elapsed})
        self.log(report)
        return {**info, "per_depth": rows, "test_accuracy": test[best]}

