"""``coopnets serve``: the real Ray Serve HTTP proxy on this machine, a tiny checkpoint, real PNG/JPEG images.

Two servers, one after the other (each a ``coopnets serve`` subprocess with its own local
Ray instance, stopped by process group): the depth controller with 2 replicas (replies
agree with the model's own logits, bad input gets its 4xx and the server keeps serving,
``/stats`` aggregates both replicas), then ``--depth 1`` from a run folder. The command-line
errors run in-process, before Ray would start.
"""
from __future__ import annotations

import io
import json
import os
import signal
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
SLO_MS = 100.0
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
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> List[int]:
    """Live processes of the session ``sid`` (the server and every Ray process it started; zombies left out)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True).stdout
    rows = (line.split() for line in out.splitlines() if line.strip())
    return [int(p) for p, s, stat in rows if int(s) == sid and not stat.startswith("Z")]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group; SIGKILL what is left of its session after 30 s."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and session_pids(proc.pid):
            proc.poll()  # reap the server itself
            time.sleep(0.2)
        if not session_pids(proc.pid):
            break
        for pid in session_pids(proc.pid):  # Ray actors run in their own process groups of this session
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    proc.wait(timeout=10)


@contextmanager
def serving(model: str, *args: str, log: Path, timeout_s: float = 240) -> Iterator[str]:
    """Run ``coopnets serve MODEL ARGS`` on a free port; yields its base URL once /healthz answers 200."""
    pytest.importorskip("ray.serve")
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "coopnets.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"coopnets serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"coopnets serve: /healthz not 200 after {timeout_s} s:\n{log.read_text()[-4000:]}")
            try:
                if http(f"{base}/healthz", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        yield base
    finally:
        stop(proc)


def one_line_error(status: int, raw: bytes) -> str:
    text = raw.decode()
    assert "\n" not in text.strip(), text
    payload = json.loads(text)
    assert list(payload) == ["error"] and isinstance(payload["error"], str) and payload["error"], payload
    assert "\n" not in payload["error"]
    return payload["error"]


# --- the depth controller, 2 replicas -------------------------------------------------------
MAX_BODY_MB = 1.0


@pytest.fixture(scope="class")
def server(run_dir, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("logs") / "serve-2-replicas.log"
    with serving(f"local-dir:{run_dir / 'model'}", "--slo-ms", str(SLO_MS), "--num-replicas", "2",
                 "--max-batch-size", "4", "--max-body-mb", str(MAX_BODY_MB), log=log) as base:
        yield base


class TestControllerTwoReplicas:
    replies: List[Dict] = []  # every answered /predict of this class, for the /stats check
    errors: Dict[int, int] = {}

    def test_healthz(self, server):
        status, raw = http(f"{server}/healthz")
        assert status == 200 and json.loads(raw)["status"] == "ok"

    def test_png_and_jpeg_answers_agree_with_the_model(self, server, reference):
        for name, image in good_images().items():
            reply = predict(server, image)
            check_answer(reply, image, reference)
            self.replies.append(reply)

    def test_concurrent_requests_are_batched_and_answered(self, server, reference):
        images = [encode(noise(100 + i), "PNG" if i % 2 else "JPEG") for i in range(24)]
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda b: predict(server, b), images))
        for reply, image in zip(replies, images):
            check_answer(reply, image, reference)
        self.replies.extend(replies)

    def test_bad_input_gets_its_4xx_and_the_server_keeps_serving(self, server, reference):
        for name, (body, expected) in bad_inputs(int(MAX_BODY_MB * 2**20)).items():
            status, raw = http(f"{server}/predict", body)
            assert status == expected, (name, status, raw)
            message = one_line_error(status, raw)
            self.errors[status] = self.errors.get(status, 0) + 1
            image = good_images()["rgb.jpg"]
            reply = predict(server, image)  # still serving, and still right
            check_answer(reply, image, reference)
            self.replies.append(reply)
            if name == "16-bit grayscale png":
                assert "16-bit" in message
            if name == "cmyk jpeg":
                assert "CMYK" in message
        assert one_line_error(*http(f"{server}/nowhere")) and http(f"{server}/nowhere")[0] == 404
        status, raw = http(f"{server}/predict", method="GET")
        assert status == 405 and "POST /predict" in one_line_error(status, raw)
        self.errors[405] = self.errors.get(405, 0) + 1

    def test_stats_aggregate_both_replicas(self, server):
        stats = json.loads(http(f"{server}/stats")[1])
        n = len(self.replies)
        assert stats["requests"] == n and stats["slo_ms"] == SLO_MS
        on_time = sum(r["latency_ms"] <= SLO_MS for r in self.replies)
        assert stats["slo_attainment"] == pytest.approx(on_time / n)
        latencies = sorted(r["latency_ms"] for r in self.replies)
        assert latencies[0] - 1e-3 <= stats["p50_ms"] <= stats["p99_ms"] <= latencies[-1] + 1e-3
        hist = {str(d): sum(r["depth"] == d for r in self.replies) for d in range(1, 5)}
        assert stats["depth_histogram"] == hist
        assert stats["errors"] == sum(self.errors.values())
        assert stats["errors_by_status"] == {str(k): v for k, v in sorted(self.errors.items())}
        assert stats["replicas"] == 2 and stats["replica_states"] == {"RUNNING": 2}
        per = stats["per_replica"]
        assert len(per) == 2, per  # 35+ requests, 24 of them concurrent: both replicas served some
        assert sum(r["requests"] for r in per.values()) == n
        for r in per.values():
            assert r["controller"]["decisions"] >= 1 and sum(r["depth_histogram"].values()) == r["requests"]
        assert stats["settings"]["controller"] == "on" and stats["settings"]["max_batch_size"] == 4


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
        stats = json.loads(http(f"{depth1_server}/stats")[1])
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
    pytest.importorskip("ray.serve")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        fails(capsys, ["serve", str(run_dir), "--port", port], f"--port {port}", "cannot listen", "1..65535")


def test_cli_without_ray(capsys, run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    fails(capsys, ["serve", str(run_dir)], "ray[serve] is not installed", "pip install 'coopnets[serve]'")


def test_import_coopnets_and_its_cli_without_ray():
    code = ("import sys, coopnets, coopnets.cli, coopnets.serving.app; coopnets.cli.build_parser(); "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


def test_without_a_recorded_table_the_cli_prefers_deeper_and_says_so(tmp_path):
    from coopnets.cli.serve import accuracies_for

    folder = coopnets.save_pretrained(coopnets.wrap("test_resnet", num_classes=3), tmp_path / "no-table", data_config=DATA_CONFIG)
    model = coopnets.create_model(f"local-dir:{folder}", pretrained=True)
    with pytest.warns(UserWarning, match="accuracies increasing with depth") as record:
        assert accuracies_for(model) == [0.25, 0.5, 0.75, 1.0]
    assert len(record) == 1
