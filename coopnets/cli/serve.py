"""``coopnets serve``: serve a depth-adaptive model over HTTP on Ray Serve, each batch's depth chosen to meet an SLO.

``MODEL`` is a zoo name (untrained), ``hf-hub:ORG/NAME[@REV]``, ``local-dir:PATH`` or a
training run folder (its ``model/`` checkpoint), resolved as ``coopnets export`` does.
Needs ``pip install 'coopnets[serve]'`` (Ray Serve). CPU only: the model stays on the CPU.

Endpoints:
    ``POST /predict``  body: one PNG or JPEG image, preprocessed as the checkpoint's
        ``pretrained_cfg`` says (``timm.data.resolve_data_config(model=m)`` +
        ``timm.data.create_transform``). Reply ``{"label", "index", "score", "depth",
        "latency_ms"}``: ``label`` from ``pretrained_cfg["label_names"]`` (else the index as
        text), ``score`` the softmax probability of ``index``, ``depth`` the depth that ran,
        ``latency_ms`` from the request's arrival at the server to its answer. Refused, each
        with a one-line JSON ``{"error": ...}`` while the server keeps serving: an empty body
        or one that is not a readable image (400), a body over ``--max-body-mb`` or an image
        over 40 Mpixel (413), GIF/BMP/TIFF/WebP, 16-bit PNG, CMYK or another non-8-bit mode (415).
    ``GET /stats``  ``requests`` (answered predictions), ``slo_ms``, ``slo_attainment`` (share
        of them with ``latency_ms <= slo_ms``), ``p50_ms``/``p99_ms`` (last 100,000),
        ``depth_histogram``, ``errors`` (refused or failed predictions; ``errors_by_status``),
        ``replicas`` (running model replicas, from Ray Serve's status), ``per_replica``
        (requests, depths and the latest controller counters of each replica), ``settings``.
    ``GET /healthz``  200 once a model replica answers (503 before).

How it runs: an ingress deployment (one replica) is the HTTP entry and holds the statistics
of every request, so ``/stats`` aggregates over all replicas; it forwards each image
through a deployment handle to one of the model replicas (``--num-replicas N``, or
``--num-replicas auto``: Ray Serve autoscaling between 1 and 4 replicas aiming at
``--max-batch-size`` ongoing requests each, fields overridden by ``--autoscaling-config``).
Each model replica decodes, batches with ``@serve.batch`` (up to ``--max-batch-size``,
waiting at most ``--batch-wait-ms`` for a batch to fill) and has its own
:class:`~coopnets.serving.DepthController`: it profiles every depth on its own hardware at
start-up, picks each batch's depth from how long the batch's requests (and the ones queued
behind it in that replica) have waited, and learns from each batch's measured time.
``--depth K`` runs depth K only (controller off, a baseline). The controller trades
latency against the checkpoint's recorded per-depth accuracies (``config.json``'s
``coopnets.per_depth``); without them it prefers the deepest depth that fits, and says so.

On a Ray cluster (``ray start --head`` on one machine, ``ray start --address HEAD:6379`` on
the others, then ``coopnets serve MODEL --address auto --host 0.0.0.0`` on the head),
replicas are spread over the nodes and a proxy listens on ``--port`` on every node that runs one. The
replicas' controllers share nothing: each one profiles and learns its own node (a slower
or busier node picks shallower depths for the same load) and sees only its own queue; the
weights travel from this process by value, so workers need ``coopnets`` installed but not
the checkpoint. Waits are measured against the ingress's wall clock, so keep the nodes'
clocks synchronised (NTP). Stopping the command (SIGINT/SIGTERM) deletes the application;
a local Ray instance started by it is shut down.

Example:
    coopnets serve runs/r18 --slo-ms 100 --host 127.0.0.1 --port 8000
    coopnets serve hf-hub:someorg/coop_resnet18.digits --slo-ms 50 --max-batch-size 16 --num-replicas 2
    coopnets serve runs/r18 --depth 2                     # baseline: always depth 2
    coopnets serve runs/r18 --num-replicas auto --autoscaling-config '{"max_replicas": 8}'
    curl -s --data-binary @cat.png http://127.0.0.1:8000/predict
    curl -s http://127.0.0.1:8000/stats
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import warnings
from typing import Any, Dict, List, Optional

from .errors import bad_value
from .export import SOURCES, load_source

#: defaults of ``--num-replicas auto`` (Ray Serve AutoscalingConfig fields; ``--autoscaling-config`` overrides)
AUTOSCALING_DEFAULTS = {"min_replicas": 1, "max_replicas": 4, "upscale_delay_s": 5.0, "downscale_delay_s": 60.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help=SOURCES)
    parser.add_argument("--slo-ms", type=float, default=100.0, help="latency objective per request, ms (default 100)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port, 1..65535 (default 8000)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="largest batch per replica (default 8)")
    parser.add_argument("--depth", type=int, default=None, help="serve only this depth, 1..num_depths (controller off)")
    parser.add_argument("--num-replicas", default="1", help="model replicas: N, or 'auto' for Ray Serve autoscaling (default 1)")
    parser.add_argument("--autoscaling-config", default=None, metavar="JSON",
                        help="Ray Serve AutoscalingConfig fields for --num-replicas auto, e.g. "
                             "'{\"min_replicas\": 1, \"max_replicas\": 4, \"target_ongoing_requests\": 8}' "
                             "(default target_ongoing_requests: --max-batch-size)")
    parser.add_argument("--batch-wait-ms", type=float, default=None,
                        help="longest wait for a batch to fill (default min(5, slo/20) ms)")
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs reserved per model replica (default 1)")
    parser.add_argument("--max-body-mb", type=float, default=10.0, help="largest accepted request body, MiB (default 10)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join ('auto' or HOST:PORT; default $RAY_ADDRESS, else a local Ray instance)")
    parser.add_argument("--num-classes", type=int, default=None, help="classes of an (untrained) zoo model")


def _num_replicas(value: str) -> Optional[int]:
    """``--num-replicas``: a positive int, or ``None`` for 'auto'."""
    if str(value).strip().lower() == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise bad_value("--num-replicas", value, "must be a positive integer or 'auto'")
    return n


def _autoscaling(args: argparse.Namespace, num_replicas: Optional[int]) -> Optional[Dict[str, Any]]:
    if args.autoscaling_config is None:
        return None if num_replicas else {**AUTOSCALING_DEFAULTS, "target_ongoing_requests": args.max_batch_size}
    if num_replicas:
        raise bad_value("--num-replicas", num_replicas, "fixes the replica count; with --autoscaling-config give --num-replicas auto")
    try:
        given = json.loads(args.autoscaling_config)
    except json.JSONDecodeError as e:
        given = e
    if not isinstance(given, dict):
        raise bad_value("--autoscaling-config", repr(args.autoscaling_config),
                   "must be a JSON object of Ray Serve AutoscalingConfig fields, e.g. '{\"max_replicas\": 4}'")
    config = {**AUTOSCALING_DEFAULTS, "target_ongoing_requests": args.max_batch_size, **given}
    from ray.serve.config import AutoscalingConfig

    try:
        AutoscalingConfig(**config)
    except Exception as e:  # pydantic's ValidationError: several lines, folded by the CLI
        raise bad_value("--autoscaling-config", repr(args.autoscaling_config), f"not a valid Ray Serve AutoscalingConfig ({e})") from None
    return config


def check_ray() -> None:
    """``ImportError`` (one line, with the install command) when Ray Serve is missing."""
    try:
        importlib.import_module("ray.serve")
    except ImportError as e:
        raise ImportError(f"ray[serve] is not installed ({e}); `coopnets serve` runs on Ray Serve: "
                          f"pip install 'coopnets[serve]'") from None


def accuracies_for(model: Any, quiet: bool = False) -> List[float]:
    """The checkpoint's recorded per-depth accuracies, or increasing ones (prefer deeper) with a one-line warning."""
    from ..serving import checkpoint_accuracies

    try:
        return checkpoint_accuracies(model)
    except ValueError as e:
        if not quiet:
            why = " ".join(str(e).split(";")[0].split())
            warnings.warn(f"no per-depth accuracy table ({why}); serving with accuracies increasing with depth, i.e. the "
                f"deepest depth that meets the SLO. Record one with `coopnets train` or "
                f"coopnets.save_pretrained(model, path, per_depth=rows).")
        return [d / model.num_depths for d in range(1, model.num_depths + 1)]


def log(message: str) -> None:
    print(f"coopnets serve: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.slo_ms) and args.slo_ms > 0):
        raise bad_value("--slo-ms", args.slo_ms, "must be a number of milliseconds > 0")
    if not 1 <= args.port <= 65535:
        raise bad_value("--port", args.port, "out of range: valid ports are 1..65535")
    if args.max_batch_size < 1:
        raise bad_value("--max-batch-size", args.max_batch_size, "must be >= 1")
    if args.batch_wait_ms is not None and not (math.isfinite(args.batch_wait_ms) and args.batch_wait_ms >= 0):
        raise bad_value("--batch-wait-ms", args.batch_wait_ms, "must be a number of milliseconds >= 0")
    if not (math.isfinite(args.replica_cpus) and args.replica_cpus > 0):
        raise bad_value("--replica-cpus", args.replica_cpus, "must be > 0")
    if not (math.isfinite(args.max_body_mb) and args.max_body_mb > 0):
        raise bad_value("--max-body-mb", args.max_body_mb, "must be > 0")
    num_replicas = _num_replicas(args.num_replicas)
    check_ray()
    autoscaling = _autoscaling(args, num_replicas)
    model = load_source(args.model, args.num_classes)
    if args.depth is not None and not 1 <= args.depth <= model.num_depths:
        raise bad_value("--depth", args.depth, f"out of range: valid depths of {args.model} are 1..{model.num_depths}")

    from ..serving.app import ServeSettings, check_port_free, serve_forever

    address = args.address or os.environ.get("RAY_ADDRESS") or None
    if address is None:  # a local Ray instance: its proxy will listen here
        check_port_free(args.host, args.port)
    settings = ServeSettings(
        slo_ms=args.slo_ms, max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms if args.batch_wait_ms is not None else min(5.0, args.slo_ms / 20),
        depth=args.depth, accuracies=tuple(accuracies_for(model, quiet=args.depth is not None)),
        num_replicas=num_replicas, autoscaling_config=autoscaling, replica_cpus=args.replica_cpus,
        max_body_bytes=int(args.max_body_mb * 2**20),
    )
    log(f"{args.model}: {model.num_depths} depths, accuracies {[round(a, 4) for a in settings.accuracies]}; "
        f"starting Ray {'(cluster ' + address + ')' if address else '(local instance)'}")
    try:
        return serve_forever(model, settings, args.model, args.host, args.port, address=address, log=log)
    except TimeoutError as e:
        raise bad_value("--address", address or "(local Ray)", f"Ray Serve did not come up: {' '.join(str(e).split())}") from None
