"""The HTTP contract of ``coopnets serve``, once, as a plain ASGI application both engines run.

The embedded server (:mod:`.local`) hands it to uvicorn; each Ray Serve replica
(:mod:`.ray_engine`) returns it from ``__serve_build_asgi_app__``. Routes:

``POST /predict``  body: one PNG or JPEG image. 200 ``{"label", "index", "score", "depth",
    "latency_ms"}``; 400 (empty or unreadable body, bad header), 413 (body over the limit),
    415 (format), 503 + ``Retry-After`` (shed), 504 (deadline passed while queued), each a
    one-line JSON ``{"error": ...}`` while the server keeps serving.
``GET /stats``  the merged counters of every replica (:func:`~coopnets.serving.stats.summarize`).
``GET /metrics``  the same counters in Prometheus' text format (:mod:`.metrics`).
``GET /healthz``  200 ``{"status": "ok", ...}`` while the batch loop runs; 503 otherwise.

Deadlines and the arrival stamp. A request is stamped when the engine hands it to this app
(for uvicorn: once its headers are parsed). A front proxy that records when it accepted
the connection can say so in ``X-Request-Start: t=<unix seconds>`` (HAProxy:
``http-request set-header X-Request-Start t=%[date(0,ms)]``, in ms; nginx: ``t=${msec}``);
an earlier stamp from it (at most 60 s earlier) is used instead, so the proxy's queue
counts. A client may send its own deadline in ``x-request-timeout-seconds`` (Ray Serve's
header): when tighter than the SLO, that request's slack counts from it, and a batch
honours its tightest deadline.

Example:
    >>> parse_timeout({"x-request-timeout-seconds": "0.25"}), parse_timeout({})
    (0.25, None)
    >>> parse_request_start({"x-request-start": "t=1700000000123"}, now_unix=1700000000.2)
    1700000000.123
"""
from __future__ import annotations

import json
import math
import socket
import time
from typing import Any, Awaitable, Callable, Dict, List, Mapping, Optional, Tuple

from .core import Reply, ServingCore, error
from .images import BadRequest
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import prometheus_text
from .stats import json_safe, summarize

#: an oversized body is still read (and dropped) up to this many times the limit, so the client gets its 413
DRAIN_FACTOR = 8
#: the client's own deadline (Ray Serve's header name)
TIMEOUT_HEADER = "x-request-timeout-seconds"
#: when a front proxy accepted the request (New Relic / Heroku convention: ``t=<unix s, ms or us>``)
REQUEST_START_HEADER = "x-request-start"
#: an ``X-Request-Start`` further back than this is ignored (clock skew, or not a stamp)
MAX_REQUEST_START_AGE_S = 60.0
ROUTES = {"/predict": "POST", "/stats": "GET", "/healthz": "GET", "/metrics": "GET"}

Snapshots = Callable[[], Awaitable[List[Dict[str, Any]]]]
ClusterState = Callable[[], Awaitable[Dict[str, Any]]]


def parse_timeout(headers: Mapping[str, str]) -> Optional[float]:
    """The client's deadline in seconds from ``x-request-timeout-seconds``; ``None`` when absent.

    Raises:
        BadRequest: 400 when the header is not a positive number of seconds.
    """
    raw = headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise BadRequest(400, f"{TIMEOUT_HEADER}: {raw!r} is not a positive number of seconds, e.g. 0.25")
    return value


def parse_request_start(headers: Mapping[str, str], now_unix: float) -> Optional[float]:
    """Unix time of ``X-Request-Start`` (``t=`` seconds, ms or us), or ``None`` when absent, unreadable,
    in the future or older than :data:`MAX_REQUEST_START_AGE_S`."""
    raw = headers.get(REQUEST_START_HEADER, "").strip()
    if raw.startswith("t="):
        raw = raw[2:]
    try:
        value = float(raw)
    except ValueError:
        return None
    for scale in (1.0, 1e3, 1e6):  # seconds, ms or us since the epoch
        t = value / scale
        if 0 <= now_unix - t <= MAX_REQUEST_START_AGE_S:
            return t
    return None


class HttpApp:
    """The ASGI application (see the module docstring).

    Args:
        core: this server's (or replica's) :class:`~coopnets.serving.core.ServingCore`.
        name: the model's name, for ``/healthz`` and ``/stats``.
        snapshots: the counters of every replica (default: this core's alone).
        cluster: extra ``/stats`` fields, e.g. Ray Serve's replica states (default: one replica).
    """

    def __init__(self, core: ServingCore, name: str, *, snapshots: Optional[Snapshots] = None,
                 cluster: Optional[ClusterState] = None) -> None:
        self.core = core
        self.name = name
        self.snapshots = snapshots or self._own_snapshot
        self.cluster = cluster or self._one_replica

    async def _own_snapshot(self) -> List[Dict[str, Any]]:
        return [self.core.snapshot()]

    @staticmethod
    async def _one_replica() -> Dict[str, Any]:
        return {"replicas": 1, "replica_states": {"RUNNING": 1}}

    # --- ASGI ---------------------------------------------------------------------------
    async def __call__(self, scope: Dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        arrived = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        start = parse_request_start(headers, time.time()) if REQUEST_START_HEADER in headers else None
        if start is not None:
            arrived -= max(0.0, time.time() - start)
        reply = await self.route(scope["method"], scope["path"], headers, receive, arrived)
        await self._send(send, reply, head=scope["method"] == "HEAD")

    @staticmethod
    async def _lifespan(receive: Callable, send: Callable) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    @staticmethod
    async def _send(send: Callable, reply: Reply, head: bool = False) -> None:
        if isinstance(reply.payload, (bytes, bytearray)):
            body = bytes(reply.payload)
            content_type = reply.headers.pop("Content-Type", METRICS_CONTENT_TYPE)
        else:
            body = json.dumps(json_safe(reply.payload), separators=(",", ":")).encode()
            content_type = "application/json"
        headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), str(v).encode()) for k, v in reply.headers.items()]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else body})

    # --- routes -------------------------------------------------------------------------
    async def route(self, method: str, path: str, headers: Mapping[str, str], receive: Callable,
                    arrived: float) -> Reply:
        """The reply to one request (``receive``: the ASGI body channel)."""
        path = path.rstrip("/") or "/"
        if path not in ROUTES:
            return error(404, f"no route {path}: use POST /predict, GET /stats, GET /metrics or GET /healthz")
        allowed = ROUTES[path]
        if method != allowed and not (allowed == "GET" and method == "HEAD"):
            if path == "/predict":
                self.core.stats.record_error(405)
            return error(405, f"{method} {path} is not allowed: use {allowed} {path}")
        if path == "/healthz":
            return self._healthz()
        if path == "/stats":
            return await self._stats()
        if path == "/metrics":
            return Reply(200, prometheus_text(await self.snapshots()), {"Content-Type": METRICS_CONTENT_TYPE})  # type: ignore[arg-type]
        return await self._predict(headers, receive, arrived)

    async def _predict(self, headers: Mapping[str, str], receive: Callable, arrived: float) -> Reply:
        try:
            timeout_s = parse_timeout(headers)
            body = await read_body(receive, headers, self.core.settings.max_body_bytes)
            if not body:
                raise BadRequest(400, "empty body: POST one PNG or JPEG image as the request body")
        except BadRequest as e:
            self.core.stats.record_error(e.status)
            return error(e.status, e.message)
        return await self.core.predict(body, arrived, timeout_s)

    def _healthz(self) -> Reply:
        try:
            self.core.check_health()
        except RuntimeError as e:
            return error(503, f"not serving: {e}")
        return Reply(200, {"status": "ok", "model": self.name, "num_depths": self.core.model.num_depths,
                           "replica": self.core.replica})

    async def _stats(self) -> Reply:
        summary = summarize(await self.snapshots())
        summary.update(await self.cluster())
        summary.update(model={"name": self.name, **self.core.info}, settings=self.core.settings.describe())
        return Reply(200, summary)


async def read_body(receive: Callable, headers: Mapping[str, str], limit: int) -> bytes:
    """The request body from an ASGI ``receive``, at most ``limit`` bytes (413 beyond).

    An oversized body is read to its end (and dropped) up to :data:`DRAIN_FACTOR` times the
    limit, so that the client, still sending, gets the 413 instead of a reset connection.

    Raises:
        BadRequest: 413 over the limit; 400 when the client went away mid-body.
    """
    declared = headers.get("content-length", "")
    too_large = declared.isdigit() and int(declared) > limit
    if too_large and int(declared) > DRAIN_FACTOR * limit:
        raise BadRequest(413, f"the body is {int(declared)} bytes, over the limit of {limit} bytes")
    chunks: List[bytes] = []
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest(400, "the client closed the connection before the body ended")
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
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


def split_url(host: str, port: int) -> Tuple[str, str]:
    """``(probe host, base URL)`` of a server listening on ``host:port`` (0.0.0.0 is probed on 127.0.0.1)."""
    probe = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return probe, f"http://{'[' + probe + ']' if ':' in probe else probe}:{port}"


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
