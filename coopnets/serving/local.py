"""The embedded engine: one process, uvicorn in front of one :class:`~coopnets.serving.core.ServingCore`.

One machine, one replica: the request goes from the socket to the batcher without a hop.
uvicorn parses HTTP (httptools, on uvloop when installed) and calls :class:`~coopnets.serving.http.HttpApp`;
decoding runs on the event loop, the batch runs on the batcher's thread with
``torch_threads`` threads. It is the default of ``coopnets serve`` on one machine; for
several replicas, autoscaling or a Ray cluster, :mod:`.ray_engine` runs the same app and the
same core on Ray Serve.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import signal
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence, Tuple

from .core import ServeSettings, ServingCore, default_torch_threads
from .http import HttpApp, split_url

if TYPE_CHECKING:
    from torch import Tensor

    from ..models.depth_adaptive import DepthAdaptiveModel


def uvicorn_config(app: Any, host: str, port: int) -> Any:
    """uvicorn's settings for serving: uvloop and httptools when installed, no access log, no lifespan."""
    import uvicorn

    return uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        backlog=4096, timeout_keep_alive=60,
    )


def serve_local(model: "DepthAdaptiveModel", settings: ServeSettings, name: str, host: str, port: int, *,
                calibration: Optional[Sequence[Tuple["Tensor", "Tensor"]]] = None,
                log: Callable[[str], None] = print) -> int:
    """Serve ``model`` on ``host:port`` until SIGINT/SIGTERM (uvicorn's own handlers); returns 0."""
    import torch
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:  # SIGINT/SIGTERM end serve_local cleanly (exit 0)
            yield

    torch.set_num_threads(settings.torch_threads or default_torch_threads())
    core = ServingCore(model, settings, calibration=calibration)
    gc.freeze()  # the model and imports are long-lived: keep them out of the collector's scans (as Ray Serve does)
    server = Server(uvicorn_config(HttpApp(core, name), host, port))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for s in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(s, lambda: setattr(server, "should_exit", True))
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            log(f"serving {name} at {split_url(host, port)[1]}: POST /predict, GET /stats, GET /metrics, "
                f"GET /healthz; embedded engine (uvicorn), {torch.get_num_threads()} torch thread(s), "
                f"{describe_policy(settings)}")
        await task

    try:
        asyncio.run(main())
    finally:
        core.close()
    log("stopped")
    return 0


def describe_policy(settings: ServeSettings) -> str:
    """One line: the controller or the fixed depth, the SLO, the batch and the admission policy."""
    what = f"fixed depth {settings.depth} (controller off)" if settings.depth else "depth controller on"
    shed = f"shedding past capacity (queue <= {settings.queue_limit})" if settings.shed else "no shedding"
    return f"{what}, SLO {settings.slo_ms:g} ms, max batch {settings.max_batch_size}, {shed}"
