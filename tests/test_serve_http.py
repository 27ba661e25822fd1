"""``coopnets serve``: both engines over real HTTP on this machine, a tiny checkpoint, real PNG/JPEG images.

The same HTTP contract is checked on both engines (each a ``coopnets serve`` subprocess,
stopped by process group): the embedded engine (uvicorn, one process) and Ray Serve with 2
replicas behind the real Ray Serve proxy (its own local Ray instance). Replies agree with
the model's own logits, bad input gets its 4xx and the server keeps serving, a client's
deadline header is honoured (an impossible one is shed with 503 and ``Retry-After``),
``/stats`` aggregates every replica and ``/metrics`` parses as Prometheus text whose
counters move. Then ``--depth 1`` from a run folder with Ray Serve autoscaling. The
command-line errors run in-process, before anything would start.
"""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import coopnets
from coopnets.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning")  # ray's pydantic

LABELS = ["cat", "dog", "bird"]
DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
               "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "label_names": LABELS}
SLO_MS = 5000.0  # generous: on a busy CI machine nothing is shed or expires unless a test asks for it
REPO = Path(__file__).resolve().parents[1]


# --- the checkpoint and images ----------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A training run folder (RUN/model) with a tiny 4-depth checkpoint, 32 px, 3 named classes."""
    torch.manual_seed(0)
    model = coopnets.wrap("test_resnet", num_classes=3)
    rows = [{"depth": d, "accuracy": 0.5 + d / 10, "params": 1000 * d, "flops": 10**6 * d, "latency_ms": 0.25 * d,
             "batch_size": 1, "device": "cpu"} for d in range(1, model.num_depths + 1)]
    run = tmp_path_factory.mktemp("serve") / "run"
    coopnets.save_pretrained(model, run / "model", per_depth=rows, data_config=DATA_CONFIG)
    return run


@pytest.fixture(scope="module")
def reference(run_dir):
    """The checkpoint loaded here, and its preprocessing, to check the server's answers."""
    model = coopnets.create_model(f"local-dir:{run_dir / 'model'}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    return model, transform


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def noise(seed: int, mode: str = "RGB", size: Tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


def good_images() -> Dict[str, bytes]:
    return {
        "rgb.png": encode(noise(1), "PNG"),
        "rgba.png": encode(noise(2, "RGBA"), "PNG"),
        "gray.png": encode(noise(3, "L", (20, 64)), "PNG"),
        "rgb.jpg": encode(noise(4, size=(64, 48)), "JPEG", quality=90),
        "gray.jpg": encode(noise(5, "L"), "JPEG"),
    }


def bad_inputs(max_body_bytes: int) -> Dict[str, Tuple[bytes, int]]:
    png = encode(noise(6), "PNG")
    return {
        "empty": (b"", 400),
        "text": (b"this is not an image at all", 400),
        "truncated png": (png[: len(png) // 3], 400),
        "png header, junk": (png[:16] + b"\x00" * 200, 400),
        "over the size limit": (png + b"\x00" * max_body_bytes, 413),
        "16-bit grayscale png": (encode(Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)), "PNG"), 415),
        "cmyk jpeg": (encode(Image.new("CMYK", (16, 16), (10, 20, 30, 40)), "JPEG"), 415),
        "gif": (encode(noise(7).convert("P"), "GIF"), 415),
    }


# --- HTTP -------------------------------------------------------------------------------------
def http(url: str, body: "bytes | None" = None, method: "str | None" = None, timeout: float = 60) -> Tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method or ("POST" if body is not None else "GET"))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def predict(base: str, body: bytes) -> Dict:
    status, raw = http(f"{base}/predict", body)
    assert status == 200, (status, raw)
    return json.loads(raw)


def check_answer(reply: Dict, image: bytes, reference) -> None:
    """The reply has exactly the documented fields and agrees with the model at the depth it reports."""
    model, transform = reference
    assert set(reply) == {"label", "index", "score", "depth", "latency_ms"}, reply
    assert reply["label"] in LABELS and LABELS[reply["index"]] == reply["label"]
    assert 1 <= reply["depth"] <= model.num_depths and reply["latency_ms"] > 0
    x = transform(Image.open(io.BytesIO(image)).convert("RGB"))[None]
    with torch.inference_mode():
        probs = torch.softmax(model.forward_depth(x, reply["depth"]), dim=-1)[0]
    top2 = probs.topk(2).values
    assert reply["index"] == int(probs.argmax()) or float(top2[0] - top2[1]) < 1e-5, (reply, probs)
    assert reply["score"] == pytest.approx(float(probs.max()), abs=1e-4), (reply, probs)


# --- the server subprocess --------------------------------------------------------------------
@contextmanager
def serving(model: str, *args: str, log: Path, timeout_s: float = 240) -> Iterator[str]:
    """Run ``coopnets serve MODEL ARGS`` on a free port (``harness.ServeProcess``: its own session, every
    process of it ended afterwards); yields its base URL once /healthz answers 200."""
    import harness

    try:
        server = harness.ServeProcess(model, args, log, timeout_s=timeout_s)
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        yield server.url
    finally:
        server.close()
        assert not server.session_pids(), "coopnets serve left processes behind"


def one_line_error(status: int, raw: bytes) -> str:
    text = raw.decode()
    assert "\n" not in text.strip(), text
    payload = json.loads(text)
    assert list(payload) == ["error"] and isinstance(payload["error"], str) and payload["error"], payload
    assert "\n" not in payload["error"]
    return payload["error"]


# --- the depth controller, on each engine -----------------------------------------------------
MAX_BODY_MB = 1.0
#: (engine, --num-replicas)
ENGINES = [("local", 1), ("ray", 2)]


@pytest.fixture(scope="class", params=ENGINES, ids=[e for e, _ in ENGINES])
def server(request, run_dir, tmp_path_factory) -> Iterator[Tuple[str, str, int]]:
    engine, replicas = request.param
    log = tmp_path_factory.mktemp("logs") / f"serve-{engine}.log"
    with serving(f"local-dir:{run_dir / 'model'}", "--engine", engine, "--slo-ms", str(SLO_MS), "--num-replicas",
                 str(replicas), "--max-batch-size", "4", "--max-body-mb", str(MAX_BODY_MB), log=log) as base:
        yield base, engine, replicas


def metric_samples(base: str) -> Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]:
    """``GET /metrics`` parsed by prometheus_client: (sample name, sorted labels without replica) -> value, summed."""
    from prometheus_client.parser import text_string_to_metric_families

    status, raw = http(f"{base}/metrics")
    assert status == 200
    out: Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(raw.decode()):
        for sample in family.samples:
            key = (sample.name, tuple(sorted((k, v) for k, v in sample.labels.items() if k != "replica")))
            out[key] = out.get(key, 0.0) + sample.value
    return out


class TestServe:
    replies: Dict[str, List[Dict]] = {}  # every answered /predict, per server, for the /stats check
    errors: Dict[str, Dict[int, int]] = {}

    def answered(self, base: str) -> List[Dict]:
        return self.replies.setdefault(base, [])

    def refused(self, base: str, status: int) -> None:
        counts = self.errors.setdefault(base, {})
        counts[status] = counts.get(status, 0) + 1

    def test_healthz(self, server):
        base, _, _ = server
        status, raw = http(f"{base}/healthz")
        assert status == 200 and json.loads(raw)["status"] == "ok"

    def test_png_and_jpeg_answers_agree_with_the_model(self, server, reference):
        base, _, _ = server
        for name, image in good_images().items():
            reply = predict(base, image)
            check_answer(reply, image, reference)
            self.answered(base).append(reply)

    def test_concurrent_requests_are_batched_and_answered(self, server, reference):
        base, _, _ = server
        images = [encode(noise(100 + i), "PNG" if i % 2 else "JPEG") for i in range(24)]
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda b: predict(base, b), images))
        for reply, image in zip(replies, images):
            check_answer(reply, image, reference)
        self.answered(base).extend(replies)

    def test_bad_input_gets_its_4xx_and_the_server_keeps_serving(self, server, reference):
        base, _, _ = server
        for name, (body, expected) in bad_inputs(int(MAX_BODY_MB * 2**20)).items():
            status, raw = http(f"{base}/predict", body)
            assert status == expected, (name, status, raw)
            message = one_line_error(status, raw)
            self.refused(base, status)
            image = good_images()["rgb.jpg"]
            reply = predict(base, image)  # still serving, and still right
            check_answer(reply, image, reference)
            self.answered(base).append(reply)
            if name == "16-bit grayscale png":
                assert "16-bit" in message
            if name == "cmyk jpeg":
                assert "CMYK" in message
        assert one_line_error(*http(f"{base}/nowhere")) and http(f"{base}/nowhere")[0] == 404
        status, raw = http(f"{base}/predict", method="GET")
        assert status == 405 and "POST /predict" in one_line_error(status, raw)
        self.refused(base, 405)

    def test_client_deadline_header(self, server, reference):
        base, engine, _ = server
        image = good_images()["rgb.png"]
        status, raw = http_with(f"{base}/predict", image, {"x-request-timeout-seconds": "soon"})
        assert status == 400 and "x-request-timeout-seconds" in one_line_error(status, raw)
        self.refused(base, 400)
        # a deadline no depth can meet is refused at admission, at once, with when to retry
        # (Ray's proxy may answer 408 itself: the deadline passed before it reached a replica)
        status, raw, headers = http_with(f"{base}/predict", image, {"x-request-timeout-seconds": "0.000001"}, headers=True)
        if not (engine == "ray" and status == 408):
            assert status == 503 and "shed" in one_line_error(status, raw) and int(headers["retry-after"]) >= 1
            self.refused(base, 503)
        # a generous one is answered as usual
        status, raw = http_with(f"{base}/predict", image, {"x-request-timeout-seconds": "30"})
        assert status == 200
        reply = json.loads(raw)
        check_answer(reply, image, reference)
        self.answered(base).append(reply)

    def test_stats_and_metrics_aggregate_every_replica(self, server):
        base, engine, replicas = server
        replies, errors = self.answered(base), self.errors.get(base, {})
        deadline = time.monotonic() + 30  # Ray replicas push their counters every 0.5 s: wait until every push is in
        while True:
            stats = json.loads(http(f"{base}/stats")[1])
            settled = (stats["requests"] == len(replies) and stats["errors"] == sum(errors.values())
                       and stats["replicas"] == replicas)
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        n = len(replies)
        assert stats["requests"] == n and stats["slo_ms"] == SLO_MS
        on_time = sum(r["latency_ms"] <= SLO_MS for r in replies)
        assert stats["slo_attainment"] == pytest.approx(on_time / n)
        latencies = sorted(r["latency_ms"] for r in replies)
        # percentiles come from ~2 %-wide histogram buckets
        assert latencies[0] * 0.97 <= stats["p50_ms"] <= stats["p99_ms"] <= latencies[-1] * 1.03
        hist = {str(d): sum(r["depth"] == d for r in replies) for d in range(1, 5)}
        assert stats["depth_histogram"] == hist
        assert stats["errors"] == sum(errors.values())
        assert stats["errors_by_status"] == {str(k): v for k, v in sorted(errors.items())}
        assert stats["shed"] == errors.get(503, 0) and stats["expired"] == 0
        assert stats["replicas"] == replicas and stats["replica_states"] == {"RUNNING": replicas}, stats["replica_states"]
        per = stats["per_replica"]
        assert len(per) == replicas, per  # 40+ requests, 24 of them concurrent: both Ray replicas served some
        assert sum(r["requests"] for r in per.values()) == n
        for r in per.values():
            assert r["controller"]["decisions"] >= 1 and sum(r["depth_histogram"].values()) == r["requests"]
        assert stats["settings"]["controller"] == "on" and stats["settings"]["max_batch_size"] == 4
        assert stats["settings"]["engine"] == engine

        before = metric_samples(base)
        by_depth = {d: before.get(("coopnets_requests_total", (("depth", d), ("option", f"depth{d}"))), 0.0)
                    for d in hist}
        assert sum(by_depth.values()) == n
        assert before[("coopnets_answers_total", (("outcome", "shed"), ("status", "503")))] == errors.get(503, 0)
        image = good_images()["gray.png"]
        reply = predict(base, image)
        self.answered(base).append(reply)
        deadline = time.monotonic() + 30
        while True:  # the counters move by exactly one answer
            after = metric_samples(base)
            moved = {k: after.get(k, 0.0) - v for k, v in before.items() if k[0] == "coopnets_requests_total"}
            if sum(moved.values()) >= 1 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        d = str(reply["depth"])
        assert moved == {k: float(k[1] == (("depth", d), ("option", f"depth{d}"))) for k in moved}


def http_with(url: str, body: bytes, extra: Dict[str, str], headers: bool = False):
    request = urllib.request.Request(url, data=body, method="POST", headers=extra)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            out = (r.status, r.read(), {k.lower(): v for k, v in r.headers.items()})
    except urllib.error.HTTPError as e:
        out = (e.code, e.read(), {k.lower(): v for k, v in e.headers.items()})
    return out if headers else out[:2]


# --- a fixed depth, from a run folder ---------------------------------------------------------
@pytest.fixture(scope="class")
def depth1_server(run_dir, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("logs") / "serve-depth-1.log"
    with serving(str(run_dir), "--slo-ms", str(SLO_MS), "--depth", "1", "--max-batch-size", "2",
                 "--num-replicas", "auto", "--autoscaling-config", '{"max_replicas": 2}', log=log) as base:
        yield base


class TestFixedDepth:
    def test_every_reply_is_depth_1(self, depth1_server, reference):
        images = [encode(noise(200 + i), "PNG") for i in range(8)]
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda b: predict(depth1_server, b), images))
        for reply, image in zip(replies, images):
            assert reply["depth"] == 1
            check_answer(reply, image, reference)
        deadline = time.monotonic() + 30  # Ray replicas push their counters every 0.5 s
        while True:
            stats = json.loads(http(f"{depth1_server}/stats")[1])
            if stats["requests"] == 8 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert stats["requests"] == 8 and stats["depth_histogram"] == {"1": 8, "2": 0, "3": 0, "4": 0}
        assert 1 <= stats["replicas"] <= 2 and stats["settings"]["controller"] == "off (fixed depth 1)"
        assert stats["settings"]["autoscaling_config"]["max_replicas"] == 2 and stats["settings"]["num_replicas"] is None
        for r in stats["per_replica"].values():
            assert r["controller"]["options"] == {"depth1": r["controller"]["decisions"]}


# --- command-line errors: one line, exit code 2, before Ray starts ---------------------------
def fails(capsys, argv: List[str], *words: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("coopnets serve: error: ") and "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def test_cli_unknown_model(capsys):
    fails(capsys, ["serve", "coop_nonet"], "unknown model 'coop_nonet'", "hf-hub:ORG/NAME", "zoo model name")


@pytest.mark.parametrize("port", ["0", "70000", "-1"])
def test_cli_port_out_of_range(capsys, run_dir, port):
    fails(capsys, ["serve", str(run_dir), "--port", port], f"--port {port}", "1..65535")


@pytest.mark.parametrize("slo", ["0", "-5", "nan"])
def test_cli_slo_must_be_positive(capsys, run_dir, slo):
    fails(capsys, ["serve", str(run_dir), "--slo-ms", slo], "--slo-ms", "> 0")


@pytest.mark.parametrize("depth", ["0", "5"])
def test_cli_depth_outside_the_models_depths(capsys, run_dir, depth):
    pytest.importorskip("ray.serve")
    fails(capsys, ["serve", str(run_dir), "--depth", depth], f"--depth {depth}", "1..4")


def test_cli_replicas_and_autoscaling_settings(capsys, run_dir):
    fails(capsys, ["serve", str(run_dir), "--num-replicas", "0"], "--num-replicas 0", "'auto'")
    pytest.importorskip("ray.serve")
    fails(capsys, ["serve", str(run_dir), "--num-replicas", "auto", "--autoscaling-config", "{max"],
          "--autoscaling-config", "JSON object")
    fails(capsys, ["serve", str(run_dir), "--num-replicas", "auto", "--autoscaling-config", '{"max_replicas": 0}'],
          "--autoscaling-config", "max_replicas")


def test_cli_port_in_use(capsys, run_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        fails(capsys, ["serve", str(run_dir), "--port", port], f"--port {port}", "cannot listen", "1..65535")


def test_cli_without_ray(capsys, run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    fails(capsys, ["serve", str(run_dir), "--num-replicas", "2"], "ray.serve is not installed",
          "pip install 'coopnets[serve]'")


def test_cli_engine_choices(capsys, run_dir):
    fails(capsys, ["serve", str(run_dir), "--engine", "local", "--num-replicas", "2"], "--engine local", "--engine ray")
    fails(capsys, ["serve", str(run_dir), "--calibration-data", str(run_dir), "--depth", "2"], "--calibration-data",
          "--depth")
    fails(capsys, ["serve", str(run_dir), "--max-queued", "0"], "--max-queued", ">= 1")
    assert main(["serve", str(run_dir), "--engine", "triton"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "local" in err and "ray" in err and "Traceback" not in err


def test_import_coopnets_and_its_cli_without_ray():
    code = ("import sys, coopnets, coopnets.cli, coopnets.serving.ray_engine, coopnets.serving.local; "
            "coopnets.cli.build_parser(); "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


def test_without_a_recorded_table_the_cli_prefers_deeper_and_says_so(tmp_path):
    from coopnets.cli.serve import accuracies_for

    folder = coopnets.save_pretrained(coopnets.wrap("test_resnet", num_classes=3), tmp_path / "no-table", data_config=DATA_CONFIG)
    model = coopnets.create_model(f"local-dir:{folder}", pretrained=True)
    with pytest.warns(UserWarning, match="accuracies increasing with depth") as record:
        assert accuracies_for(model) == [0.25, 0.5, 0.75, 1.0]
    assert len(record) == 1
