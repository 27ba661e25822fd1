"""Learning curves: every training method on training sets of increasing size, with honest statistics.

Each method (``cooperative`` first, then every other registered recipe) is trained through
the shared trainer (:func:`coopnets.train.train`) on stratified subsets of the train split
(``TrainConfig.train_subset``: ``N`` images drawn with the run's seed, repeated so every
epoch keeps about as many samples as the whole split, hence the same optimiser steps and
validations at every size). Val and test splits stay whole. Runs are *paired*: one seed
draws the same subset, and (where the recipe allows) the same initialisation of the first
net, for every method.

Reported in ``--out`` (``learning_curve.md`` / ``.png`` / ``.json``):

* per method, size and depth: mean test accuracy over seeds with a 95 % t-interval, and the
  mean over depths (computed per run, then the interval over seeds);
* ``cooperative`` three ways: the deployed Teammate (the better on validation, a best-of-two
  choice the other recipes do not get), the other Teammate, and the Teammates' mean (the
  fair row used in the paired differences);
* paired differences over matching seeds with t-intervals, for the seed papers' claims:
  cooperative vs every other method (mean over depths), ekd vs independent (per depth and
  mean), mlcsd vs byot (per depth and mean; MLCSD claims +1.18 points);
* the section "MLCSD on the 8-exit ResNet-18 layout": ``mlcsd`` and ``byot`` on
  ``resnet18`` with ``model_kwargs={"exit_points": "blocks"}`` (an exit after every
  residual block, two per stage, as MLCSD-Net; ``--no-exit8`` skips it);
* training cost: the trainer's ``wall_time_s`` (``independent``: the sum of its one run
  per depth), mean per method, relative to ``cooperative``;
* the section "Exit heads" (``--heads KIND ...``): ``--heads-methods`` (``cooperative`` and
  ``multi_exit``) on each of ``--heads-models`` with every exit-head kind (``model_kwargs=
  {"head": KIND}``; ``auto`` is each family's default), the same seeds and sizes; per depth the
  accuracy of each kind and its paired difference from the first kind (cooperative: the
  Teammates' mean). ``--no-main`` runs that section alone.

Runs execute ``--jobs`` at a time in subprocesses (one torch thread each). Each finished
run's summary is written to ``RUNS_DIR/<section>/<method>-n<size>-s<seed>.json`` at once,
so ``--resume`` skips finished runs after an interruption (or adds seeds, sizes or the
8-exit section to a finished study); the report always covers every run found there.
A hand-written "## What this shows" section already in the Markdown is kept on rewrite.

Examples::

    python benchmarks/learning_curve.py                       # the committed study (digits)
    python benchmarks/learning_curve.py --resume              # continue / add the 8-exit section
    python benchmarks/learning_curve.py --no-main --no-exit8 --heads conv auto --sizes 200 \
        --out benchmarks/results/exit_heads_accuracy --runs-dir runs/lc-heads   # exit heads compared
    python benchmarks/learning_curve.py --data-dir /data/imagenette --model resnet18 --img-size 128 \\
        --sizes 100 500 2000 all --out results/imagenette --runs-dir runs/lc-imagenette
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import multiprocessing as mp
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

import harness
from coopnets.train import TrainConfig, train
from harness import paired_difference, t_interval  # noqa: F401  (the study's statistics, re-exported)

REFERENCE = harness.REFERENCE_METHOD

NAME = "learning_curve"
MAIN, EXIT8 = "main", "exit8"
#: sections of the exit-head comparison are named ``heads-<model>-<kind>``
HEADS = "heads"
#: a head kind loses "more than" this much (points, mean difference) at some depth: the report says so
HEAD_LOSS_POINTS = 0.5
#: the deployed Teammate, the other one, their mean (rows of ``cooperative``)
COOP_DEPLOYED, COOP_OTHER, COOP_MEAN = REFERENCE, f"{REFERENCE} (other teammate)", f"{REFERENCE} (teammates' mean)"
HANDWRITTEN = "## What this shows"
CLAIMS = {"ekd": "independent", "mlcsd": "byot"}
MLCSD_CLAIM = 1.18  # points of average accuracy over self-distillation (MLCSD-Net)


# --- runs ---------------------------------------------------------------------------------
def run_key(section: str, method: str, size: int, seed: int) -> str:
    return f"{section}/{method}-n{size}-s{seed}"


def nets_test_accuracy(summary: Mapping[str, Any]) -> Dict[str, List[float]]:
    """Per-depth test accuracy of every eval net of a run (cooperative: both Teammates).

    ``Trainer.fit`` returns the deployed net's list as ``test_accuracy``; the other nets'
    numbers are its per-depth rows' ``acc NAME`` columns.
    """
    acc = summary["test_accuracy"]
    if isinstance(acc, Mapping):
        return {k: list(v) for k, v in acc.items()}
    nets = {summary.get("deployable") or "net": list(acc)}
    for row in summary.get("per_depth", []):
        for k, v in row.items():
            if k.startswith("acc "):
                nets.setdefault(k[4:], []).append(v)
    return nets


def run_one(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Train one run (``spec``: key, config fields, file paths) and save its record as JSON; return it."""
    cfg = TrainConfig(**spec["config"], out=spec["work_dir"])
    shutil.rmtree(cfg.out, ignore_errors=True)
    start = time.perf_counter()
    summary = train(cfg, echo=False)
    nets = nets_test_accuracy(summary)
    record = {
        **{k: spec[k] for k in ("key", "section", "method", "size", "seed")},
        "accuracy": list(summary["test_accuracy"]) if not isinstance(summary["test_accuracy"], Mapping)
        else nets[summary["deployable"]],
        "nets_test_accuracy": nets, "deployable": summary.get("deployable"),
        "val_accuracy": summary.get("val_accuracy"), "reference_test_accuracy": summary.get("reference_test_accuracy"),
        "wall_time_s": summary["wall_time_s"], "run_wall_time_s": summary.get("run_wall_time_s"),
        "process_time_s": time.perf_counter() - start, "config": spec["config"],
    }
    harness.write_json(spec["record"], record)
    shutil.rmtree(cfg.out, ignore_errors=True)  # weights are not kept: the record has the numbers
    return record


def _init_worker() -> None:
    torch.set_num_threads(1)


def plan_runs(sections: Mapping[str, Dict[str, Any]], seeds: Sequence[int], runs_dir: Path) -> List[Dict[str, Any]]:
    """Every run of the study, seeds outermost (an interrupted study has whole seeds), methods innermost."""
    specs = []
    for section, s in sections.items():
        for seed in seeds:
            for size in s["sizes"]:
                for method in s["methods"]:
                    key = run_key(section, method, size, seed)
                    config = {**s["config"], "method": method, "seed": seed,
                              "train_subset": None if size == s["full_size"] else size}
                    specs.append({"key": key, "section": section, "method": method, "size": size, "seed": seed,
                                  "config": config, "record": str(runs_dir / f"{key}.json"),
                                  "work_dir": str(runs_dir / "work" / key)})
    return specs


def load_records(runs_dir: Path) -> List[Dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*/*.json"))]


def same_settings(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Whether a saved run's config is this invocation's (fields unset, i.e. None, on either side are equal)."""
    def norm(c: Mapping[str, Any]) -> Dict[str, Any]:
        return {k: v for k, v in json.loads(json.dumps(c)).items() if v is not None}
    return norm(saved) == norm(wanted)


def execute(specs: List[Dict[str, Any]], jobs: int, resume: bool) -> Tuple[List[Dict[str, Any]], List[str]]:
    """Run the specs not finished yet (``resume``: records on disk with the same settings count as
    finished; a record with other settings is refused). Returns (new records, failed keys)."""
    todo = []
    for spec in specs:
        path = Path(spec["record"])
        if path.is_file() and resume:
            saved = json.loads(path.read_text())
            if not same_settings(saved.get("config") or {}, spec["config"]):
                raise SystemExit(f"--resume: {path} was trained with other settings than this invocation's; "
                                 f"use another --runs-dir or the study's own settings.")
            continue
        if path.is_file():
            raise SystemExit(f"{path} exists: pass --resume to keep finished runs, or another --runs-dir.")
        todo.append(spec)
    done: List[Dict[str, Any]] = []
    failed: List[str] = []
    if not todo:
        return done, failed

    def report(spec: Dict[str, Any], fut_result) -> None:
        try:
            r = fut_result()
        except Exception as e:  # one failed run does not end the study
            failed.append(spec["key"])
            bar.write(f"FAILED {spec['key']}: {type(e).__name__}: {str(e).strip().splitlines()[-1:] or ''}")
            return
        done.append(r)
        accs = "/".join(f"{100 * a:.1f}" for a in r["accuracy"])
        bar.write(f"{r['key']:36s} acc {accs}  train {r['wall_time_s']:.0f}s")

    with harness.progress_bar(total=len(todo), unit="run", smoothing=0.05) as bar:
        if jobs <= 1:
            for spec in todo:
                bar.set_description(spec["key"])
                report(spec, lambda s=spec: run_one(s))
                bar.update(1)
        else:
            with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker) as pool:
                futures = {pool.submit(run_one, spec): spec for spec in todo}
                for fut in cf.as_completed(futures):
                    report(futures[fut], fut.result)
                    bar.update(1)
    return done, failed


# --- tables -------------------------------------------------------------------------------
def by_row(records: Iterable[Mapping[str, Any]]) -> Dict[str, Dict[str, Dict[int, Dict[int, List[float]]]]]:
    """section -> row name -> size -> seed -> per-depth accuracy; ``cooperative`` gives three rows."""
    out: Dict[str, Dict[str, Dict[int, Dict[int, List[float]]]]] = {}
    for r in records:
        rows = {r["method"]: r["accuracy"]}
        if r["method"] == REFERENCE:
            nets = r["nets_test_accuracy"]
            other = next(v for k, v in nets.items() if k != r["deployable"])
            rows[COOP_OTHER] = other
            rows[COOP_MEAN] = [(a + b) / 2 for a, b in zip(r["accuracy"], other)]
        for name, acc in rows.items():
            out.setdefault(r["section"], {}).setdefault(name, {}).setdefault(r["size"], {})[r["seed"]] = list(acc)
    return out


def mean_over_depths(per_seed: Mapping[int, List[float]]) -> Dict[int, float]:
    return {seed: sum(acc) / len(acc) for seed, acc in per_seed.items()}


def summarise(rows: Mapping[str, Mapping[int, Mapping[int, List[float]]]]) -> Dict[str, Dict[int, Dict[str, Any]]]:
    """row -> size -> {"per_depth": [interval...], "mean": interval}, intervals over seeds."""
    table: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for name, sizes in rows.items():
        for size, per_seed in sizes.items():
            depths = len(next(iter(per_seed.values())))
            table.setdefault(name, {})[size] = {
                "per_depth": [t_interval([acc[d] for acc in per_seed.values()]) for d in range(depths)],
                "mean": t_interval(list(mean_over_depths(per_seed).values())),
            }
    return table


def differences(rows: Mapping[str, Mapping[int, Mapping[int, List[float]]]], a: str, b: str,
                per_depth: bool = True, b_depth: Optional[int] = None) -> Dict[int, Dict[str, Any]]:
    """size -> {"mean": paired difference of the mean over depths, "per_depth": [...]} for ``a - b``.

    ``b_depth`` (e.g. -1, the full depth): every depth of ``a``, and its mean over depths,
    against that one depth of ``b``.
    """
    out: Dict[int, Dict[str, Any]] = {}
    if a not in rows or b not in rows:
        return out

    def pick(per_seed: Mapping[int, List[float]], d: Optional[int]) -> Dict[int, float]:
        return mean_over_depths(per_seed) if d is None else {s: v[d] for s, v in per_seed.items()}

    for size in sorted(set(rows[a]) & set(rows[b])):
        ra, rb = rows[a][size], rows[b][size]
        entry = {"mean": paired_difference(pick(ra, None), pick(rb, b_depth))}
        if per_depth:
            depths = len(next(iter(ra.values())))
            entry["per_depth"] = [paired_difference(pick(ra, d), pick(rb, d if b_depth is None else b_depth))
                                  for d in range(depths)]
        out[size] = entry
    return out


def costs(records: Iterable[Mapping[str, Any]], section: str) -> Dict[str, Dict[str, float]]:
    """method -> mean trainer wall time over every run of the section, and relative to ``cooperative``."""
    times: Dict[str, List[float]] = {}
    for r in records:
        if r["section"] == section:
            times.setdefault(r["method"], []).append(r["wall_time_s"])
    mean = {m: sum(v) / len(v) for m, v in times.items()}
    ref = mean.get(REFERENCE)
    return {m: {"wall_time_s": t, "runs": len(times[m]), "relative": t / ref if ref else float("nan")}
            for m, t in mean.items()}


def analyse(records: List[Mapping[str, Any]]) -> Dict[str, Any]:
    """Every table of the report, from the raw run records."""
    rows = by_row(records)
    result: Dict[str, Any] = {}
    for section, sec_rows in rows.items():
        others = [m for m in sec_rows if m not in (COOP_DEPLOYED, COOP_OTHER, COOP_MEAN)] if COOP_MEAN in sec_rows else []
        result[section] = {
            "summary": summarise(sec_rows),
            "cooperative_vs": {m: {"teammates_mean": differences(sec_rows, COOP_MEAN, m, per_depth=False),
                                   "deployed": differences(sec_rows, COOP_DEPLOYED, m, per_depth=False)}
                               for m in others},
            "claims": {
                f"{COOP_MEAN} at each depth - independent at full depth (the full net trained alone)":
                    differences(sec_rows, COOP_MEAN, "independent", b_depth=-1),
                f"{COOP_MEAN} at each depth - its own full depth": differences(sec_rows, COOP_MEAN, COOP_MEAN, b_depth=-1),
                **{f"{a} - {b}": differences(sec_rows, a, b) for a, b in CLAIMS.items()},
            },
            "selection": differences(sec_rows, COOP_DEPLOYED, COOP_OTHER, per_depth=False),
            "cost": costs(records, section),
        }
    return result


# --- exit heads -----------------------------------------------------------------------------
def heads_section(model: str, kind: str) -> str:
    return f"{HEADS}-{model}-{kind}"


def resolved_head(model: str, kind: str) -> str:
    """The exit-head kind ``kind`` builds on ``model`` (``auto``: the family's default), for the report."""
    import coopnets

    net = coopnets.wrap(model, num_classes=2, head=kind)
    return str(getattr(net.exits[0], "kind", kind))


def head_rows(records: Iterable[Mapping[str, Any]], model: str, kinds: Sequence[str]) -> Dict[str, Any]:
    """``"<row>@<kind>"`` -> size -> seed -> per-depth accuracy, over the head sections of ``model``
    (cooperative's rows are its three: deployed, other, Teammates' mean)."""
    rows: Dict[str, Any] = {}
    sections = {heads_section(model, k): k for k in kinds}
    for section, per_row in by_row(r for r in records if r["section"] in sections).items():
        for name, sizes in per_row.items():
            rows[f"{name}@{sections[section]}"] = sizes
    return rows


def analyse_heads(records: List[Mapping[str, Any]], models: Sequence[str], kinds: Sequence[str],
                  methods: Sequence[str]) -> Dict[str, Any]:
    """Per model and method: each kind's per-depth summary, and each later kind minus the first (paired by seed).

    Cooperative is compared through its Teammates' mean (no best-of-two selection).
    """
    out: Dict[str, Any] = {}
    for model in models:
        rows = head_rows(records, model, kinds)
        per_method = {}
        for method in methods:
            name = COOP_MEAN if method == REFERENCE else method
            summary = summarise({k: rows[f"{name}@{k}"] for k in kinds if f"{name}@{k}" in rows})
            diffs = {k: differences(rows, f"{name}@{k}", f"{name}@{kinds[0]}") for k in kinds[1:]}
            per_method[name] = {"summary": summary, "minus_first": diffs}
        out[model] = per_method
    return out


def heads_markdown(res: Mapping[str, Any], kinds: Sequence[str], resolved: Mapping[str, Mapping[str, str]],
                   full: Optional[int]) -> List[str]:
    """Per model, method and size: accuracy per depth of every head kind, and each kind minus the first."""
    md: List[str] = []
    for model, per_method in res.items():
        names = ", ".join(f"`{k}` = {resolved[model][k]}" for k in kinds)
        md += [f"**`{model}`** ({names}):", ""]
        for method, r in per_method.items():
            sizes = sorted({s for v in r["summary"].values() for s in v})
            for size in sizes:
                depths = max(len(r["summary"][k][size]["per_depth"]) for k in r["summary"] if size in r["summary"][k])
                body = [[f"`{k}`"] + [pct(iv) for iv in r["summary"][k][size]["per_depth"]]
                        + [f"**{pct(r['summary'][k][size]['mean'])}**"] for k in kinds if size in r["summary"].get(k, {})]
                losses = []
                for k, diffs in r["minus_first"].items():
                    if size not in diffs:
                        continue
                    d = diffs[size]
                    body.append([f"`{k}` minus `{kinds[0]}`"] + [diff_cell(x) for x in d["per_depth"]]
                                + [f"**{diff_cell(d['mean'])}**"])
                    losses += [f"`{k}` at depth {i + 1} ({100 * x['mean']:+.1f})" for i, x in enumerate(d["per_depth"])
                               if 100 * x["mean"] < -HEAD_LOSS_POINTS]
                md += [f"_`{method}`, {size_label(size, full)} training images_ (test accuracy %, mean [95 % "
                       "t-interval] over seeds; differences in points, (seeds ahead / seeds)):", ""]
                md += table(["head"] + [f"depth {d + 1}" for d in range(depths)] + ["mean over depths"], body)
                md += ["", ("Loses more than " f"{HEAD_LOSS_POINTS:g} points (mean): " + ", ".join(losses) + ".")
                       if losses else f"No depth loses more than {HEAD_LOSS_POINTS:g} points (mean).", ""]
    return md


# --- report -------------------------------------------------------------------------------
def pct(iv: Mapping[str, float], signed: bool = False) -> str:
    """``93.1 [91.8, 94.4]`` (percent points; NaN bounds for a single seed are left out)."""
    return harness.format_interval(iv, "{:.1f}", scale=100, signed=signed)


def diff_cell(d: Mapping[str, Any]) -> str:
    return f"{pct(d, signed=True)} ({d['wins']}/{len(d['seeds'])})"


def table(head: List[str], body: List[List[str]]) -> List[str]:
    return harness.markdown_table(head, body).splitlines()


def ordered_rows(summary: Mapping[str, Any]) -> List[str]:
    first = [r for r in (COOP_DEPLOYED, COOP_OTHER, COOP_MEAN) if r in summary]
    return first + sorted(r for r in summary if r not in first)


def size_label(size: int, full: Optional[int]) -> str:
    return f"{size} (all)" if size == full else str(size)


def section_markdown(res: Mapping[str, Any], full: Optional[int]) -> List[str]:
    summary = res["summary"]
    names = ordered_rows(summary)
    sizes = sorted({s for v in summary.values() for s in v})
    md = ["Test accuracy (%) averaged over depths (per run, then over seeds), mean [95 % t-interval over seeds]; "
          "columns are training-set sizes.", ""]
    md += table(["method"] + [size_label(s, full) for s in sizes],
                [[f"`{n}`"] + [pct(summary[n][s]["mean"]) if s in summary[n] else "" for s in sizes] for n in names])
    seeds_n = {iv["mean"]["n"] for v in summary.values() for iv in v.values()}
    md += ["", f"Seeds per cell: {', '.join(map(str, sorted(seeds_n)))}.", ""]
    coop_rows = [m for m in res["cooperative_vs"]]
    if coop_rows:
        md += ["**Paired differences, cooperative minus each method** (mean over depths, points, [95 % t-interval], "
               "(seeds where cooperative is ahead / seeds)). Fair row: the two Teammates' mean, i.e. without the "
               "best-of-two selection on validation; below it the deployed Teammate.", ""]
        for kind, title in (("teammates_mean", "teammates' mean"), ("deployed", "deployed Teammate")):
            md += [f"_{REFERENCE} ({title}) minus:_", ""]
            md += table(["method"] + [size_label(s, full) for s in sizes],
                        [[f"`{m}`"] + [diff_cell(res["cooperative_vs"][m][kind][s]["mean"])
                                       if s in res["cooperative_vs"][m][kind] else "" for s in sizes]
                         for m in coop_rows])
            md.append("")
    if res["selection"]:
        md += ["**Selection effect**: deployed Teammate minus the other one, mean over depths: "
               + "; ".join(f"n={size_label(s, full)}: {diff_cell(d['mean'])}" for s, d in res["selection"].items())
               + ".", ""]
    for name, diffs in res["claims"].items():
        if not diffs:
            continue
        depths = len(next(iter(diffs.values()))["per_depth"])
        md += [f"**Paired differences: {name}** (points, [95 % t-interval], (seeds where the first is ahead / seeds)):", ""]
        md += table(["size"] + [f"depth {d + 1}" for d in range(depths)] + ["mean over depths"],
                    [[size_label(s, full)] + [diff_cell(x) for x in d["per_depth"]] + [f"**{diff_cell(d['mean'])}**"]
                     for s, d in diffs.items()])
        md.append("")
    md += ["**Per depth** (test accuracy %, mean [95 % t-interval] over seeds):", ""]
    for s in sizes:
        depths = max(len(summary[n][s]["per_depth"]) for n in names if s in summary[n])
        md += [f"_{size_label(s, full)} training images:_", ""]
        md += table(["method"] + [f"depth {d + 1}" for d in range(depths)] + ["mean over depths"],
                    [[f"`{n}`"] + [pct(iv) for iv in summary[n][s]["per_depth"]] + [f"**{pct(summary[n][s]['mean'])}**"]
                     for n in names if s in summary[n]])
        md.append("")
    cost = res["cost"]
    md += [f"**Training cost**: the trainer's `wall_time_s` (epochs incl. per-epoch validation; `independent`: the sum "
           f"of its one run per depth), mean over every run of the section, relative to `{REFERENCE}`. Runs shared "
           "the machine with each other (`--jobs`) and with other work, so these are rough.", ""]
    md += table(["method", "runs", "train time (s)", f"vs {REFERENCE}"],
                [[f"`{m}`", str(c["runs"]), f"{c['wall_time_s']:.1f}",
                  "" if math.isnan(c["relative"]) else f"{c['relative']:.2f}x"]
                 for m, c in sorted(cost.items(), key=lambda kv: kv[0] != REFERENCE)])
    return md + [""]


def report_of(analysis: Mapping[str, Any], meta: Mapping[str, Any], md_path: Path) -> harness.Report:
    """The study's report from its analysis and record; the hand-written section of ``md_path`` is kept."""
    s = meta["settings"]
    invocations = meta["invocations"]
    trained = [i for i in invocations if i["trained"]]  # not the re-renders of a finished study
    runs = [f"{i['started']}: {i['wall_s'] / 60:.1f} min, {i['trained']} runs trained" for i in trained]
    report = harness.Report.from_meta(NAME, "Learning curves: the training methods where data is scarce", meta)
    report.elapsed_s = sum(i["wall_s"] for i in invocations)  # the whole study, over its invocations
    report.text(
        f"{harness.describe_training(s)}, seeds {', '.join(map(str, s['seeds']))}. The training set of each run is a "
        "stratified random subset of the train split drawn with the run's seed (the same subset for every method of "
        "that seed), repeated so every epoch has about as many samples as the whole split (same steps and "
        "validations at every size). Val and test splits are whole. Paired: one seed gives every method the same "
        "subset and the same initialisation of its first net (cooperative's Teammate B and Leader are further draws).",
        f"{s['jobs']} runs at a time, 1 torch thread each, on cores shared with other work; "
        f"{len(trained)} training invocation(s) ({'; '.join(runs)}). The command is the study's: a rerun with "
        "`--resume` keeps finished runs and adds missing ones.")
    if MAIN in analysis:
        report.heading("All methods")
        report.text("\n".join(section_markdown(analysis[MAIN], meta.get("full_size"))))
    report.heading("MLCSD on the 8-exit ResNet-18 layout")
    if EXIT8 in analysis:
        e = meta["exit8"]
        report.text(f"`mlcsd` and `byot` on `{e['model']}` with `model_kwargs={json.dumps(e['model_kwargs'])}` "
                    f"({e.get('num_depths', '?')} exits: after each residual block, as MLCSD-Net's two exits per "
                    f"stage), {e['img_size']} px, {e['epochs']} epochs, the same seeds and optimiser, "
                    + (f"gradient-norm clipping at {e['clip_grad']} for both methods" if e.get("clip_grad")
                       else "no clipping") + "; otherwise as above.",
                    "\n".join(section_markdown(analysis[EXIT8], meta.get("full_size"))))
    else:
        report.text(meta.get("exit8_note") or "Not run.")
    heads = meta.get("heads")
    if heads:
        report.heading("Exit heads")
        report.text(f"`{'`, `'.join(heads['methods'])}` with each exit-head kind on each backbone: "
                    f"`model_kwargs={{\"head\": KIND}}`, {heads['img_size']} px, {heads['epochs']} epochs, the same "
                    "seeds, subsets and optimiser; otherwise as above. The first kind is the reference of the "
                    "paired differences.",
                    "\n".join(heads_markdown(meta["heads_analysis"], heads["kinds"], heads["resolved"],
                                             meta.get("full_size"))))
    report.keep_from(md_path, HANDWRITTEN, default=f"{HANDWRITTEN}\n\n(To be written by hand from the numbers above.)")
    return report


def plot(analysis: Mapping[str, Any], full: Optional[int]) -> Any:
    """One row per section: accuracy over depths vs size (bands: 95 % CI over seeds), and the
    paired differences (cooperative's Teammates' mean minus each method; 8-exit: mlcsd minus byot)."""
    plt = harness.pyplot()
    sections = [s for s in (MAIN, EXIT8) if s in analysis]
    if not sections:
        return None
    fig, axes = plt.subplots(len(sections), 2, figsize=(13, 4.6 * len(sections)), squeeze=False)
    titles = {MAIN: "all methods", EXIT8: "8-exit ResNet-18 layout"}
    names = sorted({n for s in sections for n in analysis[s]["summary"]} - {COOP_DEPLOYED, COOP_OTHER, COOP_MEAN})
    colors = {n: f"C{i + 1}" for i, n in enumerate(names)}
    colors.update({COOP_DEPLOYED: "C0", COOP_MEAN: "C0"})

    def band(ax, x, ivs, color, label, style="-"):
        ax.plot(x, [100 * iv["mean"] for iv in ivs], style, marker="o", ms=3, color=color, label=label)
        ax.fill_between(x, [100 * iv["lo"] for iv in ivs], [100 * iv["hi"] for iv in ivs], color=color, alpha=0.12)

    for (ax, dx), section in zip(axes, sections):
        res = analysis[section]
        summary = res["summary"]
        for name in (n for n in ordered_rows(summary) if n != COOP_OTHER):
            sizes = sorted(summary[name])
            band(ax, sizes, [summary[name][s]["mean"] for s in sizes], colors[name], name,
                 "--" if name == COOP_MEAN else "-")
        ax.set_ylabel("test accuracy, mean over depths (%)")
        ax.set_title(f"{titles[section]}: mean and 95 % CI over seeds", fontsize=10)
        if res["cooperative_vs"]:
            for m, d in res["cooperative_vs"].items():
                sizes = sorted(d["teammates_mean"])
                band(dx, sizes, [d["teammates_mean"][s]["mean"] for s in sizes], colors[m], f"{REFERENCE} - {m}")
            dx.set_title(f"paired: {COOP_MEAN} minus each method, 95 % CI", fontsize=10)
        for name, diffs in res["claims"].items():
            if name == "mlcsd - byot" and diffs and not res["cooperative_vs"]:
                sizes = sorted(diffs)
                band(dx, sizes, [diffs[s]["mean"] for s in sizes], colors["mlcsd"], name)
                dx.axhline(MLCSD_CLAIM, color="k", ls=":", lw=1, label=f"MLCSD's claim (+{MLCSD_CLAIM})")
                dx.set_title("paired: mlcsd minus byot, mean over depths, 95 % CI", fontsize=10)
        dx.axhline(0, color="k", lw=0.8)
        dx.set_ylabel("difference (points)")
        for a in (ax, dx):
            a.set_xscale("log")
            a.set_xlabel("training images (log scale)" + (f"; {full} = all" if full else ""))
            a.grid(alpha=0.3, which="both")
            a.legend(fontsize=7)
    fig.tight_layout()
    return fig


# --- command line ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=None, help=f"recipes (default: all; {REFERENCE} is always run)")
    p.add_argument("--sizes", nargs="+", default=["50", "100", "200", "500", "all"],
                   help="training-set sizes drawn from the train split ('all': the whole split)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    harness.add_train_arguments(p)
    p.add_argument("--limit-train", type=int, default=None, help="first N train images only (smoke tests; sizes refer to them)")
    p.add_argument("--limit-eval", type=int, default=None, help="first N val/test images only (smoke tests)")
    p.add_argument("--no-exit8", action="store_true", help="skip the 8-exit ResNet-18 section")
    p.add_argument("--exit8-model", default="resnet18")
    p.add_argument("--exit8-img-size", type=int, default=32)
    p.add_argument("--exit8-epochs", type=int, default=None, help="default: --epochs")
    p.add_argument("--exit8-sizes", nargs="+", default=["100", "all"])
    p.add_argument("--exit8-clip-grad", type=float, default=1.0,
                   help="gradient-norm clipping of both methods in the 8-exit section (0: none; without it "
                        "mlcsd diverged there in the first epoch at lr 0.05)")
    p.add_argument("--no-main", action="store_true", help="skip the main study (e.g. to run only --heads)")
    p.add_argument("--heads", nargs="+", default=None, metavar="KIND",
                   help="compare exit-head kinds (model_kwargs head=KIND; 'auto': each family's default); the first "
                        "is the reference")
    p.add_argument("--heads-models", nargs="+", default=["test_resnet", "test_efficientnet"])
    p.add_argument("--heads-methods", nargs="+", default=[REFERENCE, "multi_exit"])
    p.add_argument("--jobs", type=int, default=2, help="training runs at once, each in a subprocess with 1 torch thread")
    p.add_argument("--resume", action="store_true", help="keep finished runs in --runs-dir, train the missing ones")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for the table, plot and JSON")
    p.add_argument("--runs-dir", default="runs/learning_curve", help="one JSON per finished run (and scratch run folders)")
    return p


def resolve_sizes(sizes: Sequence[str], full: int) -> List[int]:
    out = sorted({full if s == "all" else int(s) for s in sizes})
    bad = [s for s in out if s > full]
    if bad:
        raise SystemExit(f"--sizes {bad} exceed the train split's {full} images.")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from coopnets.train.data import load_data

    methods = harness.recipe_methods(args.methods)
    if len(args.seeds) < 5:
        print(f"note: {len(args.seeds)} seed(s); the committed study uses at least 5.", file=sys.stderr)
    if args.jobs <= 1:
        torch.set_num_threads(1)
    # the study's command: a rerun with --resume is the same study
    run = harness.Report.start(NAME, "", __file__, [a for a in argv if a != "--resume"], torch_threads="1 per run")
    full = len(load_data("digits", args.data_dir, 8 if args.data_dir is None else args.img_size)
               .limited(args.limit_train).train)
    settings = harness.train_settings(args)
    common = {**{k: v for k, v in settings.items() if k not in ("model", "img_size", "epochs")},
              "limit_train": args.limit_train, "limit_eval": args.limit_eval, "progress": False, "profile_repeats": 1}
    sections: Dict[str, Dict[str, Any]] = {} if args.no_main else {
        MAIN: {"methods": methods, "sizes": resolve_sizes(args.sizes, full), "full_size": full,
               "config": {**common, "model": args.model, "img_size": args.img_size, "epochs": args.epochs}}}
    heads: Optional[Dict[str, Any]] = None
    if args.heads:
        heads = {"kinds": list(args.heads), "models": list(args.heads_models), "img_size": args.img_size,
                 "methods": harness.recipe_methods(args.heads_methods), "epochs": args.epochs,
                 "resolved": {m: {k: resolved_head(m, k) for k in args.heads} for m in args.heads_models}}
        for model in heads["models"]:
            for kind in heads["kinds"]:
                sections[heads_section(model, kind)] = {
                    "methods": heads["methods"], "sizes": resolve_sizes(args.sizes, full), "full_size": full,
                    "config": {**common, "model": model, "model_kwargs": {"head": kind}, "img_size": args.img_size,
                               "epochs": args.epochs}}
    exit8: Dict[str, Any] = {"model": args.exit8_model, "model_kwargs": {"exit_points": "blocks"},
                             "img_size": args.exit8_img_size, "epochs": args.exit8_epochs or args.epochs,
                             "clip_grad": args.exit8_clip_grad or None}
    exit8_note = "Skipped (`--no-exit8`)." if args.no_exit8 else None
    if not args.no_exit8:
        sections[EXIT8] = {"methods": ["mlcsd", "byot"], "sizes": resolve_sizes(args.exit8_sizes, full),
                           "full_size": full, "config": {**common, "model": args.exit8_model,
                                                         "model_kwargs": exit8["model_kwargs"],
                                                         "img_size": exit8["img_size"], "epochs": exit8["epochs"],
                                                         "clip_grad": exit8["clip_grad"]}}
    runs_dir, out = Path(args.runs_dir), Path(args.out)
    runs_dir.mkdir(parents=True, exist_ok=True)
    specs = plan_runs(sections, args.seeds, runs_dir)
    new, failed = execute(specs, args.jobs, args.resume)
    run.finish()
    history_path = runs_dir / "invocations.json"
    history = json.loads(history_path.read_text()) if args.resume and history_path.is_file() else []
    history.append({"started": run.started, "wall_s": run.elapsed_s, "trained": len(new), "failed": failed,
                    "argv": argv})
    harness.write_json(history_path, history)

    wanted = {s["key"] for s in specs}
    records = [r for r in load_records(runs_dir) if r["key"] in wanted]
    exit8_acc = next((r["accuracy"] for r in records if r["section"] == EXIT8), None)
    if exit8_acc is not None:
        exit8["num_depths"] = len(exit8_acc)
    analysis = analyse([r for r in records if not r["section"].startswith(HEADS)])
    meta = {**run.meta(), "invocations": history, "full_size": full, "settings": {**vars(args), "methods": methods},
            "exit8": exit8, "exit8_note": exit8_note, "heads": heads,
            "heads_analysis": analyse_heads(records, heads["models"], heads["kinds"], heads["methods"]) if heads else None}
    report = report_of(analysis, meta, out / f"{NAME}.md")
    paths = report.write(out, data={**meta, "runs": records, "analysis": analysis},
                         figure=plot(analysis, full) if analysis else None, dpi=110)
    print(paths["md"].read_text())
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":  # one error policy for every entry point: one line and exit code 2 for a bad input
    from coopnets.cli.errors import run_entry

    sys.exit(run_entry(main, prog="benchmarks/learning_curve.py"))
