"""``coopnets bench serve`` and :mod:`coopnets.bench`, against a tiny real HTTP server on 127.0.0.1.

The server (:class:`TinyServer`, stdlib ``ThreadingHTTPServer``, HTTP/1.1 keep-alive) answers
``POST /predict`` the way ``coopnets serve`` does, and does what each image's bytes tell it:
``answer=NAME`` (the label it replies), ``status=503|504|500`` (a refusal). It can add a delay
per request, serialise requests (a known capacity) or stall every request arriving in a time
window. Assertions are inequalities that hold however busy the machine is (no tight
wall-clock bounds): a stalled request's latency from its *scheduled* time is at least the
rest of the stall, the serialised server cannot answer faster than ``1 / delay``...
"""
from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest

from coopnets.bench import analyse, arrival_schedule, closed_loop, open_loop, parse_phase, parse_phases
from coopnets.bench.client import HttpClient
from coopnets.bench.images import load_folder, score
from coopnets.bench.report import classify
from coopnets.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


# --- the tiny server --------------------------------------------------------------------------
class TinyServer:
    """``POST /predict`` -> 200 ``{"label", "index", "score", "depth", "latency_ms"}``, or the status the image
    asks for (503 with Retry-After, 504, 500) as ``{"error": ...}``; ``GET /stats`` -> ``{"requests": n}``."""

    def __init__(self) -> None:
        self.classes = ["dog", "cat"]  # its own class order: not the folders' sorted order
        self.label_mode = "name"  # "name": label is the class name; "index": label is str(index)
        self.delay_s = 0.0
        self.serial_delay_s = 0.0  # >0: one request at a time, this long each (capacity 1 / delay)
        self.stall: Tuple[float, float] = (math.inf, math.inf)  # perf_counter window: arrivals held to its end
        self.requests = 0
        self.timeout_headers: List[Optional[str]] = []
        self.lock = threading.Lock()
        self.serial = threading.Lock()
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            wbufsize = 1 << 16  # one write per reply (flushed after each request) ...
            disable_nagle_algorithm = True  # ... sent at once: no 40 ms delayed-ACK stalls

            def log_message(self, *args: Any) -> None:
                pass

            def reply(self, status: int, payload: Dict[str, Any], headers: Optional[Dict[str, str]] = None) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/stats":
                    self.reply(200, {"requests": app.requests, "errors": 0})
                else:
                    self.reply(404, {"error": f"no {self.path} here"})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != "/predict":
                    self.reply(404, {"error": f"no {self.path} here"})
                    return
                self.reply(*app.answer(body, self.headers.get("x-request-timeout-seconds")))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def answer(self, body: bytes, timeout: Optional[str]) -> Tuple[int, Dict[str, Any], Dict[str, str]]:
        arrived = time.perf_counter()
        with self.lock:
            self.requests += 1
            self.timeout_headers.append(timeout)
        w0, w1 = self.stall
        if w0 <= arrived < w1:
            time.sleep(w1 - arrived)
        if self.serial_delay_s:
            with self.serial:
                time.sleep(self.serial_delay_s)
        elif self.delay_s:
            time.sleep(self.delay_s)
        fields = dict(f.split("=", 1) for f in body[len(PNG):].decode(errors="replace").split(";") if "=" in f)
        status = int(fields.get("status", 200))
        if status == 503:
            return 503, {"error": "overloaded: try again later"}, {"Retry-After": "1"}
        if status != 200:
            return status, {"error": f"refused with {status}"}, {}
        name = fields.get("answer", self.classes[0])
        index = self.classes.index(name)
        label = name if self.label_mode == "name" else str(index)
        return 200, {"label": label, "index": index, "score": 0.9, "depth": 1 + index,
                     "latency_ms": 1e3 * (time.perf_counter() - arrived)}, {}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = TinyServer()
    yield s
    s.close()


def image(**fields: Any) -> bytes:
    return PNG + ";".join(f"{k}={v}" for k, v in fields.items()).encode()


#: an ImageFolder: (class folder, file, fields); the folders sort as cat, dog (the server's order is dog, cat)
FOLDER = [("cat", "c0.png", {"answer": "cat"}), ("cat", "c1.png", {"answer": "dog"}),  # right, wrong
          ("cat", "c2.png", {"status": 503}), ("dog", "d0.png", {"answer": "dog"}),  # shed, right
          ("dog", "d1.png", {"status": 504}), ("dog", "d2.png", {"status": 500})]  # expired, error
KIND = {"c0.png": "right", "c1.png": "wrong", "c2.png": "shed", "d0.png": "right", "d1.png": "expired",
        "d2.png": "error"}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for cls, name, fields in FOLDER:
        (root / cls).mkdir(parents=True, exist_ok=True)
        (root / cls / name).write_bytes(image(**fields))
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run_http(url: str, schedule: Any, bodies: List[bytes], **client: Any) -> Tuple[list, float]:
    async with HttpClient(url, **client) as c:
        async def submit(i: int, scheduled: float) -> Any:
            return await c.predict(bodies[int(schedule.item[i])])

        return await open_loop(schedule.times, submit, drain_s=10)


# --- schedules --------------------------------------------------------------------------------
def test_schedules_are_seeded_and_have_the_right_rates():
    phases = parse_phases(["quiet:50:20", "burst:200:10", "calm:50:20"])
    a, b = arrival_schedule(phases, 7, seed=3), arrival_schedule(phases, 7, seed=3)
    assert np.array_equal(a.times, b.times) and np.array_equal(a.item, b.item)
    assert not np.array_equal(a.times[:50], arrival_schedule(phases, 7, seed=4).times[:50])
    assert np.all(np.diff(a.times) > 0)
    for i, p in enumerate(phases):  # each phase's count is within 5 sigma of rate x length (Poisson)
        t = a.times[a.phase == i]
        assert np.all((t >= p.start) & (t < p.end))
        expected = p.rate * p.duration
        assert abs(len(t) - expected) < 5 * math.sqrt(expected), (p, len(t))
    # every image about equally often (seeded permutations)
    assert np.bincount(a.item, minlength=7).min() >= len(a) // 7 - 3
    # gamma inter-arrivals: same mean rate, burstier (CV 1/sqrt(b) = 2 at b = 0.25; Poisson's is 1)
    one = parse_phases(["x:100:30"])
    cv = lambda s: float(np.std(np.diff(s.times)) / np.mean(np.diff(s.times)))  # noqa: E731
    poisson, bursty = arrival_schedule(one, 5, seed=0), arrival_schedule(one, 5, seed=0, burstiness=0.25)
    assert 0.9 < cv(poisson) < 1.1 and 1.6 < cv(bursty) < 2.4
    assert abs(len(bursty) - 3000) < 5 * math.sqrt(3000 / 0.25)
    assert 0.85 < cv(arrival_schedule(one, 5, seed=0, burstiness=4.0)) / 0.5 < 1.15  # smoother than Poisson
    # one phase's change moves no other phase's arrivals (nor a warm-up before them: they only shift)
    other = parse_phases(["quiet:50:20", "burst:400:3", "calm:50:20"], warmup_s=1.5)
    c = arrival_schedule(other, 7, seed=3)
    assert np.array_equal(c.times[c.phase == 1], a.times[a.phase == 0] + 1.5)
    assert np.allclose(c.times[c.phase == 3] - other[3].start, a.times[a.phase == 2] - phases[2].start)
    assert np.array_equal(c.item[c.phase == 3], a.item[a.phase == 2])
    with pytest.raises(ValueError, match="--burstiness"):
        arrival_schedule(one, 5, burstiness=0)
    assert parse_phase("busy:20:5:contention") == ("busy", 20.0, 5.0, True)
    for bad in ("quiet:0:3", "quiet:x:3", "quiet:5", "quiet:5:-1", ":5:5", "a:5:5:other"):
        with pytest.raises(ValueError, match="--phase"):
            parse_phase(bad)


# --- the open loop over HTTP ------------------------------------------------------------------
def test_a_server_stall_is_in_the_latency_of_the_requests_scheduled_during_it(server):
    phases = parse_phases(["steady:60:1.5"])
    schedule = arrival_schedule(phases, 1, seed=0)
    t0 = time.perf_counter()
    server.stall = (t0 + 0.5, t0 + 0.9)  # every request arriving in this window is held to its end
    outcomes, start = asyncio.run(run_http(server.url, schedule, [image(answer="dog")]))
    assert all(classify(o) == "ok" for o in outcomes)
    lat = np.array([1e3 * (o.done - t) for o, t in zip(outcomes, schedule.times)])
    scheduled = start + schedule.times
    w0, w1 = server.stall
    during = (scheduled >= w0) & (scheduled < w1 - 0.05)
    assert during.sum() >= 10
    # counted from the schedule: each waited at least the rest of the stall, however late it was sent
    assert np.all(lat[during] >= 1e3 * (w1 - scheduled[during]) - 1.0)
    # open loop: the requests of the stall were all sent (none held back by the unanswered ones before them)
    assert all(math.isfinite(o.sent) for o in outcomes) and server.requests == len(schedule)
    after = scheduled > w1 + 0.2
    assert np.median(lat[after]) < np.median(lat[during]) / 2


def test_shed_expired_errors_and_accuracy_are_counted_apart(server, folder):
    images = load_folder(folder)
    assert images.class_names == ["cat", "dog"] and images.labels.tolist() == [0, 0, 0, 1, 1, 1]
    phases = parse_phases(["a:120:1", "b:120:0.5"])
    schedule = arrival_schedule(phases, len(images), seed=1)
    outcomes, _ = asyncio.run(run_http(server.url, schedule, images.bodies, timeout_header=0.5))
    assert set(server.timeout_headers) == {"0.5"}
    kinds = [KIND[Path(images.names[k]).name] for k in schedule.item]
    correct, match = score(images, schedule.item, outcomes)
    assert match == "label"  # the server's labels are the folder names (its indices are in another order)
    result = analyse(schedule, outcomes, slo_ms=10_000, correct=correct)
    for i, p in enumerate(phases):
        mine = [k for k, ph in zip(kinds, schedule.phase) if ph == i]
        s = result["phases"][p.name]
        n = len(mine)
        right, shed = mine.count("right"), mine.count("shed")
        answered = right + mine.count("wrong")
        assert (s["requests"], s["answered"], s["shed"], s["expired"]) == (n, answered, shed, mine.count("expired"))
        assert s["errors_by_status"] == ({"500": mine.count("error")} if "error" in mine else {})
        assert s["unanswered"] == 0
        assert s["attainment"] == pytest.approx(answered / n)  # a generous SLO: every 200 is on time
        assert s["admitted_attainment"] == pytest.approx(answered / (n - shed))
        assert s["goodput_per_s"] == pytest.approx(answered / p.duration)
        assert s["effective_accuracy"] == pytest.approx(right / n)
        assert s["p99_ms"] == math.inf  # refused requests are never on time
        names = [Path(images.names[k]).name for k, ph in zip(schedule.item, schedule.phase) if ph == i]
        depth1, depth2 = names.count("c1.png") + names.count("d0.png"), names.count("c0.png")  # dog: 1, cat: 2
        assert s["depth_histogram"] == {d: c for d, c in ((1, depth1), (2, depth2)) if c}
    statuses = {o.status for o in outcomes}
    assert statuses == {200, 503, 504, 500}
    # a server whose labels are indices (as text): matched on the index of the sorted class folders
    server.label_mode, server.classes = "index", ["cat", "dog"]
    outcomes, _ = asyncio.run(run_http(server.url, schedule, images.bodies))
    correct_i, match_i = score(images, schedule.item, outcomes)
    assert match_i == "index" and np.array_equal(correct_i, correct)
    # an unlabelled folder: no accuracy
    plain = folder / "cat"
    assert score(load_folder(plain), [0], outcomes[:1]) == (None, None)


def test_closed_loop_measures_the_capacity_of_the_server(server):
    server.serial_delay_s = 0.02  # one request at a time, 20 ms each: at most 50 answers/s
    img = image(answer="cat")

    async def run() -> Any:
        async with HttpClient(server.url, max_connections=4) as c:
            async def submit(i: int, t: float) -> Any:
                return await c.predict(img)

            r = await closed_loop(submit, 1, concurrency=4, duration_s=1.5, warm_s=0.3)
            return r, c.opened

    r, opened = asyncio.run(run())
    assert r.errors == 0 and opened <= 4
    assert 15 < r.answers_per_s <= 1 / 0.02 + 1.5  # 50/s is the ceiling (+1 answer in the window's edges)
    assert r.p50_ms >= 20 and r.p99_ms >= r.p50_ms  # each waits its own 20 ms at least (4 outstanding: ~80)


# --- the command ------------------------------------------------------------------------------
def run_cli(args: List[str], capsys: Any) -> Tuple[int, str, str]:
    code = main(["bench", "serve", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_bad_inputs_one_line_exit_2_nothing_written(server, folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    out = tmp_path / "out"
    url = server.url
    cases = [
        (["ftp://127.0.0.1:8000"], "http://"),
        (["https://127.0.0.1:8000"], "https is not supported"),
        ([url, "--phase", "quiet:abc:3"], "the rate must be a number > 0"),
        ([url, "--phase", "quiet:0:3"], "the rate must be a number > 0"),
        ([url, "--phase", "quiet:-5:3"], "the rate must be a number > 0"),
        ([url, "--phase", "quiet:20"], "NAME:RATE:SECONDS"),
        ([url, "--phase", "quiet:20:0"], "the length must be a number > 0"),
        ([url, "--phase", "a:20:1", "--phase", "a:30:1"], "used twice"),
        ([url, "--burstiness", "0"], "--burstiness 0"),
        ([url, "--slo-ms", "-1"], "--slo-ms"),
        ([url, "--closed-loop", "0"], "--closed-loop 0"),
        ([url, "--closed-loop", "2", "--phase", "a:1:1"], "--closed-loop runs no phases"),
        ([f"http://127.0.0.1:{free_port()}"], "cannot be reached"),
        ([url + "/nothing-here"], "HTTP 404"),
        ([url, "--images", str(empty)], "no PNG or JPEG images"),
        ([url, "--images", str(tmp_path / "missing")], "not a folder"),
        ([url, "--images", str(folder), "--out", str(taken)], "holds other files"),
    ]
    for args, why in cases:
        target = [] if "--out" in args else ["--out", str(out)]
        code, stdout, err = run_cli([*args, *target, "--no-progress"], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("coopnets bench: error: "), (args, err)
        assert why in lines[0], (args, lines[0])
        assert stdout == "" and not out.exists(), args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "images", "taken"]
    assert (taken / "mine.txt").read_text() == "keep me" and len(list(taken.iterdir())) == 1


def test_cli_full_run_writes_md_json_png(server, folder, tmp_path, capsys):
    server.delay_s = 0.002
    out = tmp_path / "run"
    code, stdout, err = run_cli([server.url, "--images", str(folder), "--slo-ms", "2000", "--phase", "quiet:40:1",
                                 "--phase", "burst:120:1", "--phase", "busy:40:1:contention", "--warmup-s", "0.3",
                                 "--timeout-header", "1.5", "--seed", "2", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    md = (out / "bench_serve.md").read_text()
    assert stdout.strip() == md.strip()
    assert "| phase | rate req/s |" in md and "| busy (contention) | 40 |" in md and "bench_serve.png" in md
    assert "answers matched by label" in md and "quiet->burst" in md and "Contention (busy)" in md
    data = json.loads((out / "bench_serve.json").read_text())
    assert data["mode"] == "open_loop" and list(data["phases"]) == ["quiet", "burst", "busy"]
    assert data["command"].startswith(f"coopnets bench serve {server.url} --slo-ms 2000 --phase quiet:40:1")
    scored = sum(p["requests"] for p in data["phases"].values())
    warm = sum(1 for ph in data["series"]["phase"] if ph == 0)
    assert scored + warm == len(data["series"]["t"]) == server.requests - 1  # and the probe
    for p in data["phases"].values():
        assert p["shed"] > 0 and p["expired"] > 0 and p["errors_by_status"].get("500", 0) > 0
        assert 0 < p["effective_accuracy"] < p["attainment"] < p["admitted_attainment"] <= 1
        assert p["p99_ms"] == "inf"  # refused requests: never on time (JSON keeps inf as "inf")
    assert set(data["steps"]) == {"quiet->burst", "burst->busy"}
    (busy,) = data["contention"]
    assert busy["phase"] == "busy" and busy["cpu_s"] > 0 and 0 < busy["core_share"] <= 1.05
    assert data["stats_before"]["requests"] == 1 and data["stats_after"]["requests"] == server.requests
    assert set(server.timeout_headers) == {"1.5"}
    png = (out / "bench_serve.png").read_bytes()
    assert png.startswith(PNG) and len(png) > 10_000

    # the same folder again (it holds an earlier run): the closed loop, on the default digits images
    server.delay_s = 0.0
    code, stdout, err = run_cli([server.url, "--closed-loop", "2", "--duration", "0.5", "--warmup-s", "0.1",
                                 "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    data = json.loads((out / "bench_serve.json").read_text())
    assert data["mode"] == "closed_loop" and data["images"]["source"] == "digits:test"
    assert data["closed_loop"]["answers_per_s"] > 0 and data["closed_loop"]["concurrency"] == 2
    assert "| concurrency | answers/s |" in stdout
    assert not (out / "bench_serve.png").exists()  # the open loop's figure would not describe this run
