"""``coopnets serve``: serve a depth-adaptive model over HTTP, each batch's depth chosen to meet an SLO.

``MODEL`` is a zoo name (untrained), ``hf-hub:ORG/NAME[@REV]``, ``local-dir:PATH`` or a
training run folder (its ``model/`` checkpoint), resolved as ``coopnets export`` does. The
folder of an ``independent`` sweep (``coopnets train --method independent``: one separately
trained model per depth) is served as a *model family*, the model-switching baseline: the
same controller then chooses a model per batch (:mod:`coopnets.serving.family`).
CPU only: the model stays on the CPU. The HTTP contract is :mod:`coopnets.serving.http`'s.

Endpoints:
    ``POST /predict``  body: one PNG or JPEG image, preprocessed as the checkpoint's
        ``pretrained_cfg`` says. Reply ``{"label", "index", "score", "depth", "latency_ms"}``:
        ``latency_ms`` from the request's arrival at the server to its answer. A client may
        send its own deadline in ``x-request-timeout-seconds``. Refused, each with a one-line
        JSON ``{"error": ...}`` while the server keeps serving: an empty body or one that is
        not a readable image (400), a body over ``--max-body-mb`` or an image over 40 Mpixel
        (413), GIF/BMP/TIFF/WebP, 16-bit PNG, CMYK (415); shed because even the shallowest
        depth could not answer in time (503 with ``Retry-After``); deadline passed while
        queued, not computed (504).
    ``GET /stats``  ``requests``, ``slo_attainment``, ``p50_ms``/``p99_ms``,
        ``depth_histogram``, ``shed``, ``expired``, ``errors``, ``per_replica``, ``settings``...
    ``GET /metrics``  the same counters in Prometheus' text format.
    ``GET /healthz``  200 while the batch loop runs (503 otherwise).

Engines (``--engine``): ``local`` is one process, uvicorn in front of the batcher and the
controller (no hop; the default on one machine). ``ray`` runs the same HTTP app and core in
every Ray Serve replica (``--num-replicas N``, ``--num-replicas auto`` with
``--autoscaling-config``, a cluster through ``--address``; the default when any of these is
given; needs ``pip install 'coopnets[serve]'``). ``--ray-fast-path`` picks Ray Serve 2.60's
throughput mode, direct ingress or HAProxy mode for a local Ray instance.

The controller trades latency against per-depth accuracy: measured on ``--calibration-data``
(an ImageFolder or a run folder's validation split; it also adds early-exit options), else
the checkpoint's recorded *validation* accuracies. Past capacity the server sheds (503)
what it cannot answer in time, so the admitted requests keep their deadlines (``--no-shed``
queues everything instead).

Example:
    coopnets serve runs/r18 --slo-ms 100 --host 127.0.0.1 --port 8000
    coopnets serve runs/r18 --calibration-data runs/r18     # early exit, from the run's validation split
    coopnets serve runs/r18 --depth 2                        # baseline: always depth 2
    coopnets serve runs/r18-independent                      # baseline: a family of 4 separately trained models
    coopnets serve hf-hub:someorg/coop_resnet18.digits --num-replicas 2 --ray-fast-path throughput
    curl -s --data-binary @cat.png http://127.0.0.1:8000/predict
    curl -s http://127.0.0.1:8000/metrics
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

ENGINES = ("auto", "local", "ray")
#: ``--ray-fast-path`` choices (the environment of each: :data:`coopnets.serving.ray_engine.FAST_PATHS`)
FAST_PATH_NAMES = ("none", "throughput", "direct", "haproxy")
DEFAULT_FAST_PATH = "none"
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
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="local: one process, uvicorn over the batcher (no hop); ray: Ray Serve replicas; "
                             "auto (default): local unless --num-replicas is not 1 or --address is given")
    parser.add_argument("--ray-fast-path", choices=sorted(FAST_PATH_NAMES), default=DEFAULT_FAST_PATH,
                        help=f"Ray Serve 2.60 request path of a local Ray instance: throughput "
                             f"(RAY_SERVE_THROUGHPUT_OPTIMIZED=1), direct (direct ingress), haproxy, none "
                             f"(default {DEFAULT_FAST_PATH})")
    parser.add_argument("--calibration-data", default=None, metavar="PATH",
                        help="labelled images to measure per-depth accuracy and add early-exit options: an "
                             "ImageFolder (class subfolders) or a training run folder (its validation split)")
    parser.add_argument("--no-early-exit", action="store_true", help="with --calibration-data: depths only")
    parser.add_argument("--no-shed", action="store_true",
                        help="queue every request instead of answering 503 to what cannot be served in time")
    parser.add_argument("--max-queued", type=int, default=None,
                        help="most requests queued per server or replica (default 16 x --max-batch-size)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch threads of the local engine (default: one per two cores)")


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


def check_installed(module: str, needed_by: str) -> None:
    """``ImportError`` (one line, with the install command) when ``module`` of the serve extra is missing."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is not installed ({e}); {needed_by} needs it: pip install 'coopnets[serve]'") from None


def accuracies_for(model: Any, quiet: bool = False) -> List[float]:
    """The checkpoint's recorded validation accuracies per depth (the server says when it falls back to
    test accuracies), or increasing ones (prefer deeper) with a one-line warning when none are recorded."""
    from ..serving.calibration import recorded_accuracies

    try:
        recorded = recorded_accuracies(model)
    except ValueError as e:
        if not quiet:
            why = " ".join(str(e).split(";")[0].split())
            warnings.warn(f"no per-depth accuracy table ({why}); serving with accuracies increasing with depth, i.e. the "
                          f"deepest depth that meets the SLO. Record one with `coopnets train` or "
                          f"coopnets.save_pretrained(model, path, per_depth=rows), or pass --calibration-data.")
        return [d / model.num_depths for d in range(1, model.num_depths + 1)]
    if recorded.warning and not quiet:
        log(recorded.warning)
    return list(recorded.values)


def load_served(source: str, num_classes: Optional[int] = None) -> Any:
    """The model ``MODEL`` names: an ``independent`` sweep's folder is served as a model family (one
    model per depth, the model-switching baseline: :class:`~coopnets.serving.family.ModelFamily`),
    anything else as :func:`~coopnets.cli.export.load_source` loads it."""
    from ..serving.family import ModelFamily

    if os.path.isdir(source) and ModelFamily.is_sweep(source):
        family = ModelFamily.from_sweep(source)
        log(f"{source}: an `independent` sweep, served as a family of {family.num_depths} separately trained models "
            f"({', '.join(family.names)}), all loaded")
        return family
    return load_source(source, num_classes)


def log(message: str) -> None:
    print(f"coopnets serve: {message}", file=sys.stderr, flush=True)


def _engine(args: argparse.Namespace, num_replicas: Optional[int], address: Optional[str]) -> str:
    if args.engine != "auto":
        if args.engine == "local" and (num_replicas != 1 or address):
            raise bad_value("--engine", "local", "serves one replica on this machine; for --num-replicas "
                            f"{args.num_replicas} or --address use --engine ray (or auto)")
        return args.engine
    return "local" if num_replicas == 1 and not address else "ray"


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
    if args.max_queued is not None and args.max_queued < 1:
        raise bad_value("--max-queued", args.max_queued, "must be >= 1")
    if args.torch_threads is not None and args.torch_threads < 1:
        raise bad_value("--torch-threads", args.torch_threads, "must be >= 1")
    if args.calibration_data is not None and args.depth is not None:
        raise bad_value("--calibration-data", args.calibration_data, "chooses between depths; --depth fixes one "
                        "(give one of the two)")
    num_replicas = _num_replicas(args.num_replicas)
    address = args.address or os.environ.get("RAY_ADDRESS") or None
    engine = _engine(args, num_replicas, address)
    check_installed("ray.serve" if engine == "ray" else "uvicorn", f"`coopnets serve --engine {engine}`")
    autoscaling = _autoscaling(args, num_replicas)
    from ..serving.http import check_port_free

    if address is None:  # this machine will listen here
        check_port_free(args.host, args.port)
    model = load_served(args.model, args.num_classes)
    if args.depth is not None and not 1 <= args.depth <= model.num_depths:
        raise bad_value("--depth", args.depth, f"out of range: valid depths of {args.model} are 1..{model.num_depths}")
    calibration = None
    if args.calibration_data is not None:
        from ..serving.calibration import load_calibration

        try:
            calibration = load_calibration(args.calibration_data, model)
        except ValueError as e:  # its message names the path and what is accepted
            raise ValueError(f"--calibration-data {' '.join(str(e).split())}") from None
    accuracies = () if calibration else tuple(accuracies_for(model, quiet=args.depth is not None))

    from ..serving.core import ServeSettings

    settings = ServeSettings(
        slo_ms=args.slo_ms, max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms if args.batch_wait_ms is not None else min(5.0, args.slo_ms / 20),
        depth=args.depth, accuracies=accuracies, early_exit=not args.no_early_exit, shed=not args.no_shed,
        max_queued=args.max_queued, num_replicas=num_replicas, autoscaling_config=autoscaling,
        replica_cpus=args.replica_cpus, torch_threads=args.torch_threads,
        max_body_bytes=int(args.max_body_mb * 2**20), engine=engine,
    )
    source = (f"calibration data {args.calibration_data}" if calibration
              else f"accuracies {[round(a, 4) for a in settings.accuracies]}")
    log(f"{args.model}: {model.num_depths} depths, {source}; engine {engine}"
        + (f" ({'cluster ' + address if address else 'local Ray instance'})" if engine == "ray" else ""))
    if engine == "local":
        from ..serving.local import serve_local

        return serve_local(model, settings, args.model, args.host, args.port, calibration=calibration, log=log)
    from ..serving.ray_engine import serve_ray

    try:
        return serve_ray(model, settings, args.model, args.host, args.port, address=address,
                         fast_path=args.ray_fast_path, calibration=calibration, log=log)
    except TimeoutError as e:
        raise bad_value("--address", address or "(local Ray)", f"Ray Serve did not come up: {' '.join(str(e).split())}") from None
