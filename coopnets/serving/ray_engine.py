"""The Ray Serve engine: replicas, autoscaling and clusters, one hop per request.

One deployment, ``CoopnetsModel``, is the HTTP ingress: each replica runs the same
:class:`~coopnets.serving.http.HttpApp` over its own :class:`~coopnets.serving.core.ServingCore`
(``@serve.ingress`` with a late-bound ``__serve_build_asgi_app__``), so a request goes from
Ray's proxy (or, with direct ingress, from the replica's own port) straight to the replica
that batches and runs it. There is no second deployment on the request path.

* **Statistics of every replica.** Each replica pushes its counters' snapshot to a small
  named actor (:class:`StatsBoard`) every :data:`PUSH_PERIOD_S` from a background task;
  ``/stats`` and ``/metrics`` on any replica merge the board's snapshots (its own fresh
  one in place of its last push). The request path never waits on it.
* **Health.** ``check_health`` (Ray Serve calls it every ``health_check_period_s``) raises
  when the replica's batch loop has stopped or its weights are broken; after 3 failures Ray
  restarts the replica.
* **Backpressure.** A replica takes at most ``max_queued + max_batch_size`` requests, so its
  own batcher sees (and sheds) the queue; beyond that Ray's router holds at most
  ``max_queued`` more per deployment and answers 503 past it.
* **Metrics.** The counters also go to Ray's metrics export (``ray.serve.metrics``, see
  :func:`~coopnets.serving.metrics.ray_sink`).
* **Fast paths** (:data:`FAST_PATHS`): Ray Serve 2.60's throughput mode, direct ingress and
  HAProxy mode are environment variables read when Ray starts; ``coopnets serve
  --ray-fast-path`` sets them for a local instance.

Ray is imported only inside functions, so ``import coopnets`` works without ``ray[serve]``.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from .core import ServeSettings, ServingCore
from .http import HttpApp, split_url
from .local import describe_policy

if TYPE_CHECKING:
    from torch import Tensor

    from ..models.depth_adaptive import DepthAdaptiveModel

APP_NAME = "coopnets"
MODEL_NAME = "CoopnetsModel"
BOARD_NAME = "coopnets-stats"
NAMESPACE = "coopnets"
#: seconds between two pushes of a replica's counters to the board
PUSH_PERIOD_S = 0.5
#: ``--ray-fast-path`` choices: the environment each sets before Ray starts (Ray Serve 2.60)
FAST_PATHS: Dict[str, Dict[str, str]] = {
    "none": {},
    "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "direct": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
}


class StatsBoard:
    """The latest counters' snapshot of every replica (a Ray actor; no CPU reserved)."""

    def __init__(self) -> None:
        self.snapshots: Dict[str, Dict[str, Any]] = {}

    def push(self, snapshot: Dict[str, Any]) -> None:
        self.snapshots[snapshot["replica"]] = snapshot

    def all(self) -> List[Dict[str, Any]]:
        return list(self.snapshots.values())


class Replica:
    """One replica of ``CoopnetsModel``: a core, its HTTP app, a stats pusher and a health check."""

    def __init__(self, model: "DepthAdaptiveModel", settings: ServeSettings, name: str,
                 calibration: Optional[Sequence[Tuple["Tensor", "Tensor"]]] = None) -> None:
        import torch
        from ray import serve

        from .metrics import ray_sink

        torch.set_num_threads(max(1, int(settings.replica_cpus)))
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a Serve replica (tests of the class itself)
            replica = f"local-{os.getpid()}"
        self.core = ServingCore(model, settings, calibration=calibration, replica=replica,
                                sink=ray_sink(model.num_depths))
        self.name = name
        self._board: Any = None
        self._pusher: Optional[asyncio.Task] = None

    async def __serve_build_asgi_app__(self) -> HttpApp:
        self._pusher = asyncio.get_running_loop().create_task(self._push_forever())
        return HttpApp(self.core, self.name, snapshots=self._snapshots, cluster=self._cluster)

    def check_health(self) -> None:
        self.core.check_health()

    def _get_board(self) -> Any:
        if self._board is None:
            import ray

            try:
                self._board = ray.get_actor(BOARD_NAME, namespace=NAMESPACE)
            except ValueError:  # not created (an app deployed without serve_forever): own counters only
                return None
        return self._board

    async def _push_forever(self) -> None:
        while True:
            await asyncio.sleep(PUSH_PERIOD_S)
            board = self._get_board()
            if board is not None:
                try:
                    await board.push.remote(self.core.snapshot())
                except Exception:  # the board is gone (shutting down): try again next period
                    self._board = None

    async def _snapshots(self) -> List[Dict[str, Any]]:
        own = self.core.snapshot()
        board = self._get_board()
        others: List[Dict[str, Any]] = []
        if board is not None:
            try:
                others = await asyncio.wait_for(board.all.remote(), timeout=10)
            except Exception:
                others = []
        return [own] + [s for s in others if s.get("replica") != own["replica"]]

    async def _cluster(self) -> Dict[str, Any]:
        from ray import serve

        def states() -> Dict[str, int]:
            app = serve.status().applications.get(APP_NAME)
            deployment = app.deployments.get(MODEL_NAME) if app else None
            return {str(getattr(k, "value", k)): int(v) for k, v in (deployment.replica_states if deployment else {}).items()}

        try:
            found = await asyncio.to_thread(states)
        except Exception:
            found = {}
        return {"replicas": found.get("RUNNING", 0), "replica_states": found}


def build_app(model: "DepthAdaptiveModel", settings: ServeSettings, name: str,
              calibration: Optional[Sequence[Tuple["Tensor", "Tensor"]]] = None) -> Any:
    """The Ray Serve application (one ingress deployment of :class:`Replica`) serving ``model``.

    The model goes to the replicas by value (through Ray's object store), so on a cluster
    the replicas need no access to the checkpoint's folder or Hub cache; every node needs
    the same ``coopnets`` installed.
    """
    from ray import serve

    options: Dict[str, Any] = dict(
        name=MODEL_NAME, ray_actor_options={"num_cpus": settings.replica_cpus},
        max_ongoing_requests=settings.queue_limit + settings.max_batch_size,
        max_queued_requests=settings.queue_limit,
        logging_config={"log_level": "WARNING", "enable_access_log": False},
        max_constructor_retry_count=3, health_check_period_s=5.0, health_check_timeout_s=10.0,
    )
    if settings.autoscaling_config is not None:
        options.update(num_replicas="auto", autoscaling_config=dict(settings.autoscaling_config))
    else:
        options.update(num_replicas=settings.num_replicas)
    deployment = serve.deployment(**options)(serve.ingress()(Replica))
    return deployment.bind(model, settings, name, calibration)


def serve_ray(model: "DepthAdaptiveModel", settings: ServeSettings, name: str, host: str, port: int, *,
              address: Optional[str] = None, fast_path: str = "none",
              calibration: Optional[Sequence[Tuple["Tensor", "Tensor"]]] = None,
              log: Callable[[str], None] = print) -> int:
    """Start Ray (a local instance, or join the cluster at ``address``), deploy, and serve until SIGINT/SIGTERM.

    ``fast_path`` (:data:`FAST_PATHS`) sets Ray Serve's environment before a local instance
    starts (a cluster keeps the environment its nodes were started with). On a local
    instance everything started here is stopped at the end; on a cluster only the
    application ``coopnets`` and the statistics board are removed.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    local = not address
    if local:
        os.environ.update(FAST_PATHS[fast_path])
    import logging

    import ray
    from ray import serve

    needed = (settings.num_replicas or (settings.autoscaling_config or {}).get("max_replicas", 1)) * settings.replica_cpus
    if local:
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(needed)), include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=True)
    else:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    board = ray.remote(StatsBoard).options(name=BOARD_NAME, namespace=NAMESPACE, num_cpus=0,
                                           get_if_exists=True).remote()
    try:
        serve.start(http_options={"host": host, "port": port},
                    logging_config={"log_level": "WARNING", "enable_access_log": False})
        serve.run(build_app(model, settings, name, calibration), name=APP_NAME, route_prefix="/", blocking=False)
        base = split_url(host, port)[1]
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
        log(f"serving {name} at {base}: POST /predict, GET /stats, GET /metrics, GET /healthz; Ray Serve "
            f"(fast path: {fast_path}), {replicas}, {describe_policy(settings)}")
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
                ray.kill(board)
                ray.shutdown()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def wait_healthy(url: str, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> Dict[str, Any]:
    """Poll ``url`` (``/healthz``) until it answers 200; its JSON. ``TimeoutError`` after ``timeout_s``."""
    import urllib.error
    import urllib.request

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
