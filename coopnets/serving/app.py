"""``coopnets serve`` on Ray Serve: an HTTP ingress and the model replicas, each with its own depth controller.

Two deployments form the application ``coopnets`` (route prefix ``/``):

``CoopnetsIngress`` (one replica, no CPU reserved)
    the HTTP entry. It stamps each request's arrival, reads the body (at most
    ``max_body_bytes``: 413 beyond), forwards it through a deployment handle to a model
    replica, and answers. It holds the statistics of every request, whichever replica
    served it, so ``GET /stats`` aggregates over all replicas; the number of live replicas
    comes from Ray Serve's own status (``serve.status()``).
``CoopnetsModel`` (``num_replicas`` replicas, or Ray Serve autoscaling)
    decodes and checks the image (:func:`~coopnets.serving.images.decode_image`), preprocesses it as the
    checkpoint's ``pretrained_cfg`` says (``timm.data.resolve_data_config(model=m)`` +
    ``timm.data.create_transform``), and queues it for ``@serve.batch``. Each batch goes to
    this replica's :class:`~coopnets.serving.DepthController`, with every request's wait
    since its arrival at the ingress and the waits of the requests queued behind the batch;
    the controller picks the depth (or, with ``depth=K``, always runs depth K), runs it and
    learns its latency. Every replica profiles and learns on its own hardware: replicas do
    not share a latency model.

Latency (reply and ``/stats``) counts from the moment the request reached the ingress
until its answer was ready there: body read, hop to the replica, decoding, queueing,
batching and the forward pass. SLO attainment is the share of answered requests with
``latency_ms <= slo_ms``.

Ray is imported only inside the functions and methods that need it, so this module (and
``import coopnets``) works without ``ray[serve]`` installed.

Request checking is :mod:`.images`, the statistics :mod:`.stats`.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from .images import BadRequest, decode_image
from .stats import ServingStats, json_safe

if TYPE_CHECKING:
    from ..models.depth_adaptive import DepthAdaptiveModel

APP_NAME = "coopnets"
INGRESS_NAME = "CoopnetsIngress"
MODEL_NAME = "CoopnetsModel"
#: an oversized body is still read (and dropped) up to this many times the limit, so the client gets its 413
DRAIN_FACTOR = 8


# --- settings ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServeSettings:
    """Everything the deployments need besides the model (validated by ``coopnets serve``).

    Attributes:
        slo_ms: latency objective per request.
        max_batch_size: largest batch ``@serve.batch`` forms.
        batch_wait_ms: how long a batch waits to fill (``@serve.batch``'s ``batch_wait_timeout_s``).
        depth: serve only this depth, controller off (a baseline); ``None``: the controller decides.
        accuracies: per-depth accuracy the controller trades against latency, depth 1 first
            (empty: the checkpoint's recorded table, read by each replica).
        num_replicas: model replicas (``None`` with ``autoscaling_config``).
        autoscaling_config: Ray Serve ``AutoscalingConfig`` fields for the model deployment.
        replica_cpus: CPUs reserved per model replica (also its torch threads).
        max_body_bytes / max_pixels: request size limits (413 beyond).
        max_ongoing_requests: per model replica; default ``max(4 * max_batch_size, 32)``,
            so requests queue in the replica (where the controller sees them) rather than in
            the ingress's router.
    """

    slo_ms: float = 100.0
    max_batch_size: int = 8
    batch_wait_ms: float = 5.0
    depth: Optional[int] = None
    accuracies: Tuple[float, ...] = ()
    num_replicas: Optional[int] = 1
    autoscaling_config: Optional[Dict[str, Any]] = None
    replica_cpus: float = 1.0
    max_body_bytes: int = 10 * 2**20
    max_pixels: int = 40_000_000
    max_ongoing_requests: Optional[int] = None

    @property
    def replica_max_ongoing(self) -> int:
        return self.max_ongoing_requests or max(4 * self.max_batch_size, 32)

    def describe(self) -> Dict[str, Any]:
        out = asdict(self)
        out["controller"] = f"off (fixed depth {self.depth})" if self.depth else "on"
        out["max_ongoing_requests"] = self.replica_max_ongoing
        return out


# --- the deployments (plain classes; build_app wraps them with serve.deployment) --------------
class ModelReplica:
    """One model replica: decoding, preprocessing, ``@serve.batch`` and its own depth controller."""

    def __init__(self, model: "DepthAdaptiveModel", settings: ServeSettings) -> None:
        import timm
        import torch
        from ray import serve

        from .controller import DepthController

        torch.set_num_threads(max(1, int(settings.replica_cpus)))
        self.settings = settings
        self.model = model.eval()
        data_config = timm.data.resolve_data_config(model=self.model)
        self.transform = timm.data.create_transform(**data_config)
        names = self.model.pretrained_cfg.get("label_names")
        self.labels: List[str] = list(names) if names else [str(i) for i in range(self.model.num_classes)]
        self.controller = DepthController.for_model(
            self.model, settings.slo_ms, accuracies=list(settings.accuracies) or None, depth=settings.depth,
            input_size=tuple(data_config["input_size"]), max_batch_size=settings.max_batch_size,
        )
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a Serve replica (tests of the class itself)
            self.replica_id = f"local-{os.getpid()}"
        self._pending: Dict[int, float] = {}  # request id -> arrival (unix time) of requests not yet in a batch
        self._ids = itertools.count()
        self._infer = serve.batch(max_batch_size=settings.max_batch_size,
                                  batch_wait_timeout_s=settings.batch_wait_ms / 1000.0)(self._run_batch)

    def ping(self) -> Dict[str, Any]:
        return {"replica": self.replica_id, "num_depths": self.model.num_depths}

    def _preprocess(self, body: bytes):
        image = decode_image(body, self.settings.max_body_bytes, self.settings.max_pixels)
        return self.transform(image)

    async def predict(self, body: bytes, arrived: float) -> Dict[str, Any]:
        """One request: ``body`` (image bytes), ``arrived`` (unix time it reached the ingress)."""
        try:
            x = await asyncio.to_thread(self._preprocess, body)
        except BadRequest as e:
            return {"status": e.status, "error": e.message}
        self.controller.observe_arrival()  # the rate this replica must keep up with
        rid = next(self._ids)
        self._pending[rid] = arrived
        try:
            return await self._infer((rid, x, arrived))
        finally:
            self._pending.pop(rid, None)

    async def _run_batch(self, items: List[Tuple[int, Any, float]]) -> List[Dict[str, Any]]:
        import torch

        for rid, _, _ in items:
            self._pending.pop(rid, None)
        now = time.time()
        waited = [max(0.0, (now - arrived) * 1000.0) for _, _, arrived in items]
        backlog = [max(0.0, (now - a) * 1000.0) for a in sorted(self._pending.values())]
        x = torch.stack([t for _, t, _ in items])
        logits, depths, decision = await asyncio.to_thread(self.controller.run, x, waited, backlog_waited_ms=backlog)
        probs = torch.softmax(logits.float(), dim=-1)
        scores, indices = probs.max(dim=-1)
        controller = {**self.controller.stats(), "last_option": decision.option.name, "last_fits": decision.fits,
                      "last_predicted_ms": decision.predicted_ms, "last_run_ms": decision.run_ms}
        return [
            {"index": int(i), "label": self.labels[int(i)], "score": float(s), "depth": int(d),
             "replica": self.replica_id, "batch_size": len(items), "controller": controller}
            for i, s, d in zip(indices.tolist(), scores.tolist(), depths.tolist())
        ]


class Ingress:
    """The HTTP entry: routes, body limit, forwarding to the model replicas, and the statistics of all."""

    def __init__(self, model_handle: Any, settings: ServeSettings, info: Dict[str, Any]) -> None:
        self.model = model_handle
        self.settings = settings
        self.info = info
        self.stats = ServingStats(settings.slo_ms, info["num_depths"])

    @staticmethod
    def _json(payload: Dict[str, Any], status: int = 200):
        from starlette.responses import JSONResponse

        return JSONResponse(json_safe(payload), status_code=status)

    def _error(self, status: int, message: str, count: bool = True):
        if count:
            self.stats.record_error(status)
        return self._json({"error": " ".join(message.split())}, status)

    async def __call__(self, request: Any):
        started = time.perf_counter()
        arrived = time.time()
        path = request.url.path.rstrip("/") or "/"
        routes = {"/predict": "POST", "/stats": "GET", "/healthz": "GET"}
        if path not in routes:
            return self._error(404, f"no route {path}: use POST /predict, GET /stats or GET /healthz", count=False)
        if request.method != routes[path] and not (routes[path] == "GET" and request.method == "HEAD"):
            return self._error(405, f"{request.method} {path} is not allowed: use {routes[path]} {path}", count=path == "/predict")
        if path == "/healthz":
            return await self._healthz()
        if path == "/stats":
            return await self._stats()
        return await self._predict(request, started, arrived)

    async def _read_body(self, request: Any) -> bytes:
        """The body, at most ``max_body_bytes`` (413 beyond).

        An oversized body is read to its end (and dropped) up to :data:`DRAIN_FACTOR` times
        the limit, so that the client, still sending, gets the 413 instead of a reset
        connection; beyond that the connection is cut.
        """
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_large = declared.isdigit() and int(declared) > limit
        if too_large and int(declared) > DRAIN_FACTOR * limit:
            raise BadRequest(413, f"the body is {int(declared)} bytes, over the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                too_large = True
                chunks.clear()
                if size > DRAIN_FACTOR * limit:
                    break
            elif not too_large:
                chunks.append(chunk)
        if too_large:
            raise BadRequest(413, f"the body is {declared or f'over {size}'} bytes, over the limit of {limit} bytes")
        return b"".join(chunks)

    async def _predict(self, request: Any, started: float, arrived: float):
        try:
            body = await self._read_body(request)
            if not body:
                raise BadRequest(400, "empty body: POST one PNG or JPEG image as the request body")
        except BadRequest as e:
            return self._error(e.status, e.message)
        except Exception as e:  # the client went away mid-body, a malformed chunked body...
            return self._error(400, f"could not read the request body ({type(e).__name__}: {e})")
        try:
            result = await self.model.predict.remote(body, arrived)
        except Exception as e:  # a replica died or raised: answer, keep serving
            unavailable = type(e).__name__ in ("RayActorError", "ActorDiedError", "ActorUnavailableError",
                                               "BackPressureError", "DeploymentUnavailableError")
            return self._error(503 if unavailable else 500, f"{'model unavailable' if unavailable else 'internal error'}: "
                                                            f"{type(e).__name__}: {e}")
        if "error" in result:
            return self._error(result["status"], result["error"])
        latency_ms = (time.perf_counter() - started) * 1000.0
        self.stats.record(latency_ms, result["depth"], result["replica"], result.get("controller"), result["batch_size"])
        return self._json({"label": result["label"], "index": result["index"], "score": result["score"],
                           "depth": result["depth"], "latency_ms": latency_ms})

    async def _replica_states(self) -> Dict[str, int]:
        from ray import serve

        def states() -> Dict[str, int]:
            app = serve.status().applications.get(APP_NAME)
            deployment = app.deployments.get(MODEL_NAME) if app else None
            return {str(getattr(k, "value", k)): int(v) for k, v in (deployment.replica_states if deployment else {}).items()}

        try:
            return await asyncio.to_thread(states)
        except Exception:
            return {}

    async def _stats(self):
        summary = self.stats.summary()
        states = await self._replica_states()
        summary.update(replicas=states.get("RUNNING", 0), replica_states=states,
                       model=self.info, settings=self.settings.describe())
        return self._json(summary)

    async def _healthz(self):
        try:
            pong = await asyncio.wait_for(self._ping(), timeout=10.0)
        except Exception as e:
            return self._json({"error": f"model not ready: {type(e).__name__}: {e}"}, 503)
        return self._json({"status": "ok", "model": self.info["name"], "num_depths": self.info["num_depths"],
                           "replica": pong["replica"]})

    async def _ping(self) -> Dict[str, Any]:
        return await self.model.ping.remote()


# --- building and running ---------------------------------------------------------------------
def build_app(model: "DepthAdaptiveModel", settings: ServeSettings, name: str):
    """The Ray Serve application (``Ingress`` bound to ``ModelReplica``) serving ``model``.

    The model goes to the replicas by value (through Ray's object store), so on a cluster
    the replicas need no access to the checkpoint's folder or Hub cache; every node needs
    the same ``coopnets`` installed.
    """
    from ray import serve

    logging_config = {"log_level": "WARNING", "enable_access_log": False}
    replica_options: Dict[str, Any] = dict(
        name=MODEL_NAME, ray_actor_options={"num_cpus": settings.replica_cpus},
        max_ongoing_requests=settings.replica_max_ongoing, logging_config=logging_config,
        max_constructor_retry_count=3,
    )
    if settings.autoscaling_config is not None:
        replica_options.update(num_replicas="auto", autoscaling_config=dict(settings.autoscaling_config))
    else:
        replica_options.update(num_replicas=settings.num_replicas)
    model_deployment = serve.deployment(**replica_options)(ModelReplica)
    ingress_deployment = serve.deployment(
        name=INGRESS_NAME, num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=100_000, logging_config=logging_config, max_constructor_retry_count=3,
    )(Ingress)
    info = {"name": name, "num_depths": model.num_depths, "num_classes": model.num_classes,
            "label_names": list(model.pretrained_cfg.get("label_names") or []),
            "accuracies": list(settings.accuracies)}
    return ingress_deployment.bind(model_deployment.bind(model, settings), settings, info)


def check_port_free(host: str, port: int) -> None:
    """``ValueError`` naming ``--host``/``--port`` when nothing can listen there."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r}: not an address of this machine ({e}); e.g. 127.0.0.1 or 0.0.0.0") from e
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise ValueError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); choose a free port in 1..65535") from e


def wait_healthy(url: str, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> Dict[str, Any]:
    """Poll ``url`` (``/healthz``) until it answers 200; its JSON. ``TimeoutError`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline and alive():
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except OSError as e:
            last = str(e)
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f} s (last: {last})")


def serve_forever(model: "DepthAdaptiveModel", settings: ServeSettings, name: str, host: str, port: int,
                  address: Optional[str] = None, log: Callable[[str], None] = print) -> int:
    """Start Ray (a local instance, or join the cluster at ``address``), deploy, and serve until SIGINT/SIGTERM.

    On a local instance everything started here is stopped at the end; on a cluster only
    the application ``coopnets`` is deleted (Serve and its proxies stay up).
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import logging

    import ray
    from ray import serve

    local = not address
    needed = (settings.num_replicas or (settings.autoscaling_config or {}).get("max_replicas", 1)) * settings.replica_cpus
    if local:
        check_port_free(host, port)
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(needed)), include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=True)
    else:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": host, "port": port},
                    logging_config={"log_level": "WARNING", "enable_access_log": False})
        serve.run(build_app(model, settings, name), name=APP_NAME, route_prefix="/", blocking=False)
        probe_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        base = f"http://{'[' + probe_host + ']' if ':' in probe_host else probe_host}:{port}"
        try:
            wait_healthy(f"{base}/healthz", timeout_s=300, alive=lambda: not stop.is_set())
        except TimeoutError as e:
            if stop.is_set():
                log("stopped before it served")
                return 0
            raise TimeoutError(f"{e}; if Serve already ran on this Ray cluster with other HTTP options, those "
                               f"stay (use its port, or `serve shutdown` first)") from None
        replicas = (f"{settings.num_replicas} replica(s)" if settings.autoscaling_config is None
                    else f"autoscaling {json.dumps(settings.autoscaling_config, sort_keys=True)}")
        controller = f"fixed depth {settings.depth} (controller off)" if settings.depth else f"depth controller on, SLO {settings.slo_ms:g} ms"
        log(f"serving {name} at {base}: POST /predict, GET /stats, GET /healthz; {replicas}, {controller}, "
            f"max batch {settings.max_batch_size}")
        sys.stdout.flush()
        while not stop.wait(1.0):
            pass
        log("stopping")
        return 0
    finally:
        try:
            if local:
                ray.shutdown()
            else:
                serve.delete(APP_NAME)
                ray.shutdown()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
