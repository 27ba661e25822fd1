"""One server's request path, engine-free: decode, admit, batch, decide, answer, count.

:class:`ServingCore` is what an engine runs behind its HTTP front: the embedded server
(:mod:`.local`, uvicorn) holds one, and so does every Ray Serve replica (:mod:`.ray_engine`).
It owns the model, its preprocessing (``timm.data.resolve_data_config(model=m)`` +
``timm.data.create_transform``), the :class:`~coopnets.serving.DepthController`, the
:class:`~coopnets.serving.DynamicBatcher` (deadlines, admission, expiry) and the
:class:`~coopnets.serving.stats.ServingStats` that ``/stats`` and ``/metrics`` read.
:meth:`ServingCore.predict` turns one request body into a :class:`Reply`:

* 200 ``{label, index, score, depth, latency_ms}``: ``latency_ms`` from the request's
  arrival stamp (the engine's front door) to its answer;
* 400 / 413 / 415 for a body that is not a served image (:mod:`.images`);
* 503 with ``Retry-After`` when it is shed at admission: even the shallowest depth, at full
  batches, could not answer it before its deadline (or the queue is full);
* 504 when its deadline passed while it was queued: it was not computed.

The HTTP routes, headers and status codes around it are :mod:`.http`'s.

Example:
    >>> import asyncio, io, time, coopnets
    >>> from PIL import Image
    >>> m = coopnets.wrap("test_resnet", num_classes=3)
    >>> core = ServingCore(m, ServeSettings(slo_ms=5000, max_batch_size=2, accuracies=(0.5, 0.6, 0.7, 0.8)), profile_repeats=1)
    >>> buf = io.BytesIO(); Image.new("RGB", (40, 30), (90, 20, 200)).save(buf, format="PNG")
    >>> reply = asyncio.run(core.predict(buf.getvalue(), arrived=time.perf_counter()))
    >>> reply.status, sorted(reply.payload), reply.payload["depth"] in (1, 2, 3, 4)
    (200, ['depth', 'index', 'label', 'latency_ms', 'score'], True)
    >>> asyncio.run(core.predict(b"not an image", arrived=time.perf_counter())).status
    400
    >>> core.close()
"""
from __future__ import annotations

import asyncio
import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..inference.profiler import parameter_bytes
from .batcher import DeadlineExpired, DynamicBatcher, Overloaded
from .controller import DepthController
from .family import ModelFamily
from .images import BadRequest, decode_image
from .stats import ServingStats

if TYPE_CHECKING:
    from ..models.depth_adaptive import DepthAdaptiveModel
    from .metrics import MetricSink

#: bodies up to this size are decoded on the event loop (cheaper than a thread hop); larger ones in a thread
INLINE_DECODE_BYTES = 256 * 2**10
#: seconds between two measurements of the event loop's lag
LAG_PERIOD_S = 0.01


@dataclass(frozen=True)
class ServeSettings:
    """Everything a server needs besides the model (validated by ``coopnets serve``).

    Attributes:
        slo_ms: latency objective per request, from its arrival at the server.
        max_batch_size: largest batch formed.
        batch_wait_ms: how long a batch waits to fill.
        depth: serve only this depth, controller off (a baseline); ``None``: the controller decides.
        accuracies: per-depth accuracy the controller trades against latency, depth 1 first
            (empty: the checkpoint's recorded validation table).
        early_exit: add early-exit options when calibration data is given.
        shed: refuse at once (503) what cannot be answered in time, instead of queueing it.
        max_queued: the most requests queued per server or replica (default ``16 * max_batch_size``).
        num_replicas: Ray Serve replicas (``None`` with ``autoscaling_config``).
        autoscaling_config: Ray Serve ``AutoscalingConfig`` fields.
        replica_cpus: CPUs reserved per Ray replica (also its torch threads).
        torch_threads: torch threads of the embedded server (default: 1 per 2 cores, at least 1).
        max_body_bytes / max_pixels: request size limits (413 beyond).
        engine: ``"local"`` (embedded uvicorn server) or ``"ray"`` (Ray Serve replicas).
    """

    slo_ms: float = 100.0
    max_batch_size: int = 8
    batch_wait_ms: float = 5.0
    depth: Optional[int] = None
    accuracies: Tuple[float, ...] = ()
    early_exit: bool = True
    shed: bool = True
    max_queued: Optional[int] = None
    num_replicas: Optional[int] = 1
    autoscaling_config: Optional[Dict[str, Any]] = None
    replica_cpus: float = 1.0
    torch_threads: Optional[int] = None
    max_body_bytes: int = 10 * 2**20
    max_pixels: int = 40_000_000
    engine: str = "local"

    @property
    def queue_limit(self) -> int:
        return self.max_queued or 16 * self.max_batch_size

    def describe(self) -> Dict[str, Any]:
        out = asdict(self)
        out["controller"] = f"off (fixed depth {self.depth})" if self.depth else "on"
        out["max_queued"] = self.queue_limit
        return out


@dataclass
class Reply:
    """An engine-free HTTP answer: ``status``, a JSON ``payload`` and extra ``headers``."""

    status: int
    payload: Dict[str, Any]
    headers: Dict[str, str] = field(default_factory=dict)


def error(status: int, message: str, headers: Optional[Dict[str, str]] = None) -> Reply:
    """A one-line JSON error ``{"error": message}``."""
    return Reply(status, {"error": " ".join(str(message).split())}, headers or {})


class ServingCore:
    """A model served with deadlines: see the module docstring.

    Args:
        model: the depth-adaptive model (put in eval mode, on the CPU), or a
            :class:`~coopnets.serving.family.ModelFamily` (the model-switching baseline).
        settings: the server's settings.
        calibration: labelled ``(images, labels)`` batches; per-depth accuracy is measured on
            them and early-exit options are added (``settings.early_exit``).
        replica: this server's name in ``/stats`` and ``/metrics``.
        sink: a second home for the counters (Ray's metrics export), see :mod:`.metrics`.
        profile_repeats: timed runs per cell when profiling the latency prior.
    """

    def __init__(self, model: "Union[DepthAdaptiveModel, ModelFamily]", settings: ServeSettings, *,
                 calibration: Optional[Sequence[Tuple[Tensor, Tensor]]] = None, replica: str = "local",
                 sink: Optional["MetricSink"] = None, profile_repeats: int = 3) -> None:
        import timm

        self.settings = settings
        self.replica = replica
        self.model = model.eval()
        self.data_config = timm.data.resolve_data_config(model=self.model)
        self.transform = timm.data.create_transform(**self.data_config)
        names = self.model.pretrained_cfg.get("label_names")
        self.labels: List[str] = list(names) if names else [str(i) for i in range(self.model.num_classes)]
        self.controller = DepthController.for_model(
            self.model, settings.slo_ms, accuracies=list(settings.accuracies) or None,
            calibration=calibration or None, early_exit=settings.early_exit, depth=settings.depth,
            input_size=tuple(self.data_config["input_size"]), max_batch_size=settings.max_batch_size,
            repeats=profile_repeats,
        )
        #: what the served weights hold in memory (a model family: per member, with its load time)
        self._weights: Dict[str, Any] = {"parameter_bytes": parameter_bytes(self.model),
                                          **(self.model.describe() if isinstance(self.model, ModelFamily) else {})}
        self.stats = ServingStats(settings.slo_ms, self.model.num_depths, replica=replica, sink=sink)
        #: how late this server's event loop runs its callbacks (s): the wait in front of the arrival stamp
        self.loop_lag_s = 0.0
        self._lag_task: Optional[asyncio.Task] = None
        self.batcher = DynamicBatcher(
            self.controller, max_batch_size=settings.max_batch_size, batch_wait_timeout_s=settings.batch_wait_ms / 1e3,
            shed=settings.shed, max_queued=settings.queue_limit, expire=True, on_batch=self.stats.record_batch,
        )

    @property
    def info(self) -> Dict[str, Any]:
        """What ``/healthz`` and ``/stats`` say about the model and its options."""
        return {"num_depths": self.model.num_depths, "num_classes": self.model.num_classes,
                "label_names": self.labels, "replica": self.replica, **self._weights,
                "options": [{"name": o.name, "depth": o.depth, "accuracy": o.accuracy} for o in self.controller.options]}

    def snapshot(self) -> Dict[str, Any]:
        """This server's counters (:meth:`ServingStats.snapshot`), with the controller's read now, not per batch."""
        self.stats.set_controller(self.controller.stats())
        return self.stats.snapshot()

    def _preprocess(self, body: bytes) -> Tensor:
        image = decode_image(body, self.settings.max_body_bytes, self.settings.max_pixels)
        return self.transform(image)

    async def predict(self, body: bytes, arrived: float, timeout_s: Optional[float] = None) -> Reply:
        """Answer one request: ``body`` (image bytes) that arrived at ``arrived`` (``time.perf_counter()``);
        ``timeout_s``: the client's own deadline, used when tighter than the SLO.

        On the local engine the wait in front of the arrival stamp counts too: when its one
        event loop lags (it runs callbacks late because it is saturated), requests have waited
        about that long in the socket before uvicorn parsed them, so the stamp is moved back by
        the loop's lag; and their answers wait about as long again to be written, so the
        deadline the batcher admits and expires by is that much sooner. (A Ray Serve replica's
        loop is not its front door, Ray's proxy is: there the stamp stays as it is.)
        """
        lag = 0.0
        if self.settings.engine == "local":  # the engine's only event loop: its lag is the wait in front of the stamp
            loop = asyncio.get_running_loop()
            if self._lag_task is None or self._lag_task.get_loop() is not loop:
                self._lag_task = loop.create_task(self._watch_loop())
            lag = self.loop_lag_s
        arrived -= lag
        # the answer needs about the lag again to get out: what could only be computed that late is shed or expires
        deadline = self.batcher.deadline_of(arrived, arrived + timeout_s if timeout_s is not None else None) - lag
        try:
            if self.settings.shed:
                self.batcher.admit(deadline)  # before decoding: a shed request costs no decoding
            x = self._preprocess(body) if len(body) <= INLINE_DECODE_BYTES else await asyncio.to_thread(self._preprocess, body)
        except BadRequest as e:
            self.stats.record_error(e.status)
            return error(e.status, e.message)
        except Overloaded as e:
            return self._shed(e)
        try:
            result = await self.batcher.serve(x, arrival=arrived, deadline=deadline)
        except Overloaded as e:
            return self._shed(e)
        except DeadlineExpired as e:
            self.stats.record_expired()
            return error(504, f"{e}; it was not computed")
        except Exception as e:  # a failed batch: answer, keep serving
            self.stats.record_error(500)
            return error(500, f"internal error: {type(e).__name__}: {e}")
        latency_ms = (time.perf_counter() - arrived) * 1e3
        self.stats.record_answer(latency_ms, result.depth, result.decision.option.name)
        probs = torch.softmax(result.logits.float(), dim=-1)
        score, index = probs.max(dim=-1)
        return Reply(200, {"label": self.labels[int(index)], "index": int(index), "score": float(score),
                           "depth": int(result.depth), "latency_ms": latency_ms})

    def _shed(self, e: Overloaded) -> Reply:
        self.stats.record_shed(503)
        return error(503, f"overloaded, request shed: {e}; retry after {e.retry_after_s} s",
                     {"Retry-After": str(e.retry_after_s)})

    async def _watch_loop(self) -> None:
        """Keep :attr:`loop_lag_s`: how late a :data:`LAG_PERIOD_S` timer of this event loop fires."""
        while True:
            start = time.perf_counter()
            await asyncio.sleep(LAG_PERIOD_S)
            self.loop_lag_s = max(0.0, time.perf_counter() - start - LAG_PERIOD_S)

    def check_health(self) -> None:
        """``RuntimeError`` when this server cannot answer: its batch loop is dead or its model fails."""
        if not self.batcher.alive:
            raise RuntimeError("the batch loop has stopped")
        params = next(self.model.parameters(), None)
        if params is not None and not bool(torch.isfinite(params).all()):
            raise RuntimeError("the model's weights are not finite")

    def close(self) -> None:
        """Stop the batch loop (queued requests are still answered) and the loop watch."""
        if self._lag_task is not None:
            self._lag_task.cancel()
        self.batcher.close(timeout=30)


def default_torch_threads() -> int:
    """Torch threads of the embedded server: one per two cores (the rest decode and answer), at least one."""
    return max(1, (os.cpu_count() or 2) // 2)
