"""A small asyncio HTTP/1.1 client with keep-alive connections, for ``POST URL/predict``.

Why not aiohttp: the load generator usually shares the machine with the server it
measures, so its own CPU time per request is taken from the server. This client does only
what the load test needs (one request per connection at a time, ``Content-Length`` or
chunked replies, keep-alive) and costs about a third of aiohttp's CPU per request (measured
on one shared 2-core machine, 4,000 POSTs of 2 kB, 16 at a time, to a minimal asyncio server:
43 µs of client CPU per request against aiohttp 3.14's 140 µs).

Connections are opened on demand, up to ``max_connections`` at once, and kept open for the
next request (a request waits for a free connection only when all of them are busy, and
that wait is in its latency). A reused connection that the server had closed while idle is
replaced and the request sent again, once, when nothing of its answer had arrived.

Every request's result is a mapping :class:`coopnets.bench.openloop.Outcome` reads:
``status``; for a 200 with a prediction ``pred`` (the reply's ``index``), ``label``,
``depth``, ``server_ms`` (the reply's ``latency_ms``) and ``score``; otherwise ``error``
(``HTTP 503: overloaded``, or the connection's failure with ``status`` 0).

Example:
    >>> split_url("http://127.0.0.1:8000/")
    ('127.0.0.1', 8000, '')
    >>> split_url("http://example.org/app/predict")
    ('example.org', 80, '/app')
    >>> split_url("https://example.org")
    Traceback (most recent call last):
    ...
    ValueError: URL https://example.org: give an http:// address of the server, e.g. http://127.0.0.1:8000 (https is not supported)
"""
from __future__ import annotations

import asyncio
import json
import math
import urllib.parse
from typing import Any, Dict, List, Mapping, Optional, Tuple

__all__ = ["HttpClient", "HttpReply", "split_url"]

#: bytes of a reply's status line and headers accepted
MAX_HEAD = 64 * 1024


def split_url(url: str) -> Tuple[str, int, str]:
    """``(host, port, path prefix)`` of an ``http://HOST[:PORT][/PREFIX]`` URL (a trailing ``/predict`` is
    dropped: requests go to ``PREFIX/predict`` and ``PREFIX/stats``); ``ValueError`` for anything else."""
    example = "e.g. http://127.0.0.1:8000"
    try:
        u = urllib.parse.urlsplit(str(url))
        port = u.port
    except ValueError as e:
        raise ValueError(f"URL {url}: not a valid address ({e}), {example}") from None
    if u.scheme != "http":
        extra = " (https is not supported)" if u.scheme == "https" else ""
        raise ValueError(f"URL {url}: give an http:// address of the server, {example}{extra}")
    if not u.hostname:
        raise ValueError(f"URL {url}: no host in it, {example}")
    if u.query or u.fragment:
        raise ValueError(f"URL {url}: give the server's address without a query or fragment, {example}")
    path = u.path.rstrip("/")
    if path.endswith("/predict"):
        path = path[: -len("/predict")]
    host = u.hostname if ":" not in u.hostname else f"[{u.hostname}]"
    return host.strip("[]"), port or 80, path


class HttpReply:
    """A reply: ``status``, lower-cased ``headers`` and the ``body`` bytes."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: Dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


class _Stale(Exception):
    """A reused connection closed before any byte of the answer: safe to send again."""


class HttpClient:
    """Keep-alive HTTP/1.1 connections to one server (``http://HOST:PORT[/PREFIX]``), on the running loop.

    Use it inside a coroutine (``async with HttpClient(url) as c: r = await c.predict(body)``).
    ``timeout_header`` (seconds), when given, is sent as ``x-request-timeout-seconds``: the
    request's deadline at the server. ``connect_timeout_s`` bounds opening a connection;
    replies are waited for without limit (the caller's drain bounds the run).
    """

    def __init__(self, url: str, max_connections: int = 256, timeout_header: Optional[float] = None,
                 connect_timeout_s: float = 10.0) -> None:
        self.host, self.port, self.prefix = split_url(url)
        self.url = str(url)
        if max_connections < 1:
            raise ValueError(f"--connections {max_connections}: must be >= 1")
        self.max_connections = int(max_connections)
        self.timeout_header = timeout_header
        self.connect_timeout_s = float(connect_timeout_s)
        self._idle: List[Tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots: Optional[asyncio.Semaphore] = None
        self._host_header = (f"[{self.host}]" if ":" in self.host else self.host) + (
            "" if self.port == 80 else f":{self.port}")
        self.opened = 0  # connections opened so far

    async def __aenter__(self) -> "HttpClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the idle connections (busy ones close when their request ends or is cancelled)."""
        idle, self._idle = self._idle, []
        for _, w in idle:
            w.close()
        for _, w in idle:
            try:
                await w.wait_closed()
            except (OSError, asyncio.CancelledError):
                pass

    def _head(self, method: str, path: str, headers: Mapping[str, str], length: Optional[int]) -> bytes:
        lines = [f"{method} {self.prefix}{path} HTTP/1.1", f"Host: {self._host_header}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if length is not None:
            lines.append(f"Content-Length: {length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _open(self) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        r, w = await asyncio.wait_for(asyncio.open_connection(self.host, self.port, limit=MAX_HEAD),
                                      self.connect_timeout_s)
        self.opened += 1
        return r, w

    @staticmethod
    async def _read(reader: asyncio.StreamReader, fresh: bool) -> Tuple[HttpReply, bool]:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            if not e.partial and not fresh:
                raise _Stale() from None
            raise ConnectionError(f"the server closed the connection mid-answer ({len(e.partial)} bytes)") from None
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        try:
            status = int(rest[:3])
        except ValueError:
            raise ConnectionError(f"not an HTTP reply: {lines[0][:60]!r}") from None
        headers: Dict[str, str] = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        conn = headers.get("connection", "").lower()
        keep = ("close" not in conn) if version == "HTTP/1.1" else ("keep-alive" in conn)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                        pass
                    break
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            body = b"".join(parts)
        elif "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif status in (204, 304) or 100 <= status < 200:
            body = b""
        else:
            body, keep = await reader.read(), False
        return HttpReply(status, headers, body), keep

    async def request(self, method: str, path: str, body: Optional[bytes] = None,
                      headers: Optional[Mapping[str, str]] = None) -> HttpReply:
        """One request on a free keep-alive connection (a new one when none is idle); transport failures raise
        ``OSError``/``ConnectionError``/``asyncio.TimeoutError``."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_connections)
        head = self._head(method, path, headers or {}, len(body) if body is not None else None)
        async with self._slots:
            for attempt in range(2):
                fresh = not self._idle
                reader, writer = await self._open() if fresh else self._idle.pop()
                keep = False
                try:
                    writer.write(head + body if body is not None and len(body) < 65536 else head)
                    if body is not None and len(body) >= 65536:
                        writer.write(body)
                    await writer.drain()
                    reply, keep = await self._read(reader, fresh)
                    return reply
                except _Stale:
                    if attempt:
                        raise ConnectionError("the server closed the connection before answering") from None
                except (ConnectionResetError, BrokenPipeError) as e:
                    if fresh or attempt:
                        raise
                    del e  # a stale keep-alive connection: try once more on a new one
                finally:
                    if keep:
                        self._idle.append((reader, writer))
                    else:
                        writer.close()
            raise ConnectionError("unreachable")  # pragma: no cover

    async def predict(self, body: bytes, content_type: str = "image/png") -> Dict[str, Any]:
        """``POST PREFIX/predict`` of one image; the result mapping (module docstring). Never raises for a
        refused request or a failed connection (they are results), only when cancelled."""
        headers = {"Content-Type": content_type}
        if self.timeout_header is not None:
            headers["x-request-timeout-seconds"] = f"{self.timeout_header:g}"
        try:
            reply = await self.request("POST", "/predict", body, headers)
        except (OSError, asyncio.TimeoutError, ValueError) as e:
            return {"status": 0, "error": f"connection failed: {type(e).__name__}: {e}".rstrip(": ")}
        return predict_result(reply)

    async def get_json(self, path: str) -> Any:
        """``GET PREFIX/path`` as JSON; ``ValueError`` for a status other than 200 or a body that is not JSON."""
        reply = await self.request("GET", path)
        if reply.status != 200:
            raise ValueError(f"GET {path}: HTTP {reply.status}")
        return reply.json()


def predict_result(reply: HttpReply) -> Dict[str, Any]:
    """The result mapping of a ``/predict`` reply.

    Example:
        >>> predict_result(HttpReply(200, {}, b'{"label": "cat", "index": 3, "score": 0.9, "depth": 2, "latency_ms": 4.5}'))
        {'status': 200, 'pred': 3, 'label': 'cat', 'depth': 2, 'server_ms': 4.5, 'score': 0.9}
        >>> predict_result(HttpReply(503, {"retry-after": "1"}, b'{"error": "overloaded"}'))
        {'status': 503, 'error': 'HTTP 503: overloaded', 'retry_after': '1'}
    """
    try:
        payload = reply.json()
    except ValueError:
        payload = None
    if reply.status == 200 and isinstance(payload, dict) and "index" in payload:
        try:
            return {"status": 200, "pred": int(payload["index"]), "label": str(payload.get("label", "")),
                    "depth": int(payload.get("depth") or 0),
                    "server_ms": float(payload["latency_ms"]) if payload.get("latency_ms") is not None else math.nan,
                    "score": float(payload["score"]) if payload.get("score") is not None else math.nan}
        except (TypeError, ValueError):
            pass
    if isinstance(payload, dict) and payload.get("error"):
        why = " ".join(str(payload["error"]).split())[:200]
    else:
        why = " ".join(reply.body[:120].decode("utf-8", "replace").split()) or "(empty body)"
        if reply.status == 200:
            why = f"not a prediction: {why}"
    out: Dict[str, Any] = {"status": reply.status, "error": f"HTTP {reply.status}: {why}"}
    if "retry-after" in reply.headers:
        out["retry_after"] = reply.headers["retry-after"]
    return out
