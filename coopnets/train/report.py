"""What a run writes for people: ``config.json``, ``metrics.jsonl``, ``results.md`` and ``results.png``.

``metrics.jsonl`` holds one JSON line per epoch and a final line (``"final": true``);
``results.md`` is the per-depth table (:func:`coopnets.inference.profiler.format_table`)
and ``results.png`` accuracy against FLOPs, one point per depth, titled with model,
method, data and split, with the run's plain reference nets (``info["reference_test_accuracy"]``)
as horizontal lines. When the folder had no ``test/`` (``info["test_split"] == "val"``)
both say "validation": the split that picked the deployed net is never called "test".

Example:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / METRICS
    >>> for epoch in (1, 2, 3):
    ...     append_jsonl(path, {"epoch": epoch, "train_loss": 1 / epoch, "val_accuracy": {"net": [0.5, 0.75]},
    ...                         "elapsed_s": 10.0 * epoch})
    >>> truncate_metrics(path, 2)  # resuming from the epoch-2 checkpoint drops epoch 3
    >>> [epoch_line(json.loads(line)) for line in path.read_text().splitlines()][-1]
    'epoch 2: loss 0.5000  val acc per depth  net: 0.500/0.750  (20s)'
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from ..inference.profiler import format_table

#: the file name of a run's metrics log, in its run folder
METRICS = "metrics.jsonl"


# --- metrics --------------------------------------------------------------------------
def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON (values JSON does not know as ``str``)."""
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line."""
    with path.open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def truncate_metrics(path: Path, epoch: int) -> None:
    """Drop ``metrics.jsonl`` lines past the checkpoint's ``epoch`` (written after it by an interrupted run)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if json.loads(line).get("epoch", epoch + 1) <= epoch]
        path.write_text("".join(line + "\n" for line in keep))


def epoch_line(r: Mapping[str, Any]) -> str:
    """One epoch's record as the line printed after the epoch."""
    val = "  ".join(f"{k}: " + "/".join(f"{a:.3f}" for a in v) for k, v in r["val_accuracy"].items())
    return f"epoch {r['epoch']}: loss {r['train_loss']:.4f}  val acc per depth  {val}  ({r['elapsed_s']:.0f}s)"


# --- results --------------------------------------------------------------------------
def write_results(out: Path, info: Mapping[str, Any], rows: List[Dict[str, Any]], about: str) -> str:
    """Write the per-depth table (``results.md``) and accuracy-vs-FLOPs plot (``results.png``); returns the report."""
    val = ("val_accuracy",) if "val_accuracy" in rows[0] else ()
    table = format_table(rows, extra=("accuracy", *val, *[k for k in rows[0] if k.startswith("acc ")]))
    split = split_name(info)
    note = ("" if split == "test" else
            " The data has no test split: accuracies are on the validation split, which also picked the deployed net, "
            "so they are optimistic.")
    report = (
        f"# {info['method']} training of {info['model']} on {info['dataset']}\n\n"
        f"{info['epochs']} epochs, seed {info['seed']}, training wall time {info['wall_time_s']:.0f} s. {about}{note}\n\n"
        f"{table}\n"
    )
    (out / "results.md").write_text(report)
    title = f"{info['model']}, {info['method']} on {Path(str(info['dataset'])).name}: {split} split"
    plot_accuracy_vs_flops(rows, info["test_accuracy"], info["deployable"], out / "results.png", title=title,
                           references=info.get("reference_test_accuracy"), split=split)
    return report


def split_name(info: Mapping[str, Any]) -> str:
    """The split the reported accuracies are on, in words: ``"test"`` or ``"validation"``.

    Example:
        >>> split_name({"test_split": "val"}), split_name({})
        ('validation', 'test')
    """
    return "test" if info.get("test_split", "test") == "test" else "validation"


def plot_accuracy_vs_flops(
    rows: List[Dict[str, Any]], test: Mapping[str, List[float]], best: Optional[str], path: Path,
    title: str = "", references: Optional[Mapping[str, float]] = None, split: str = "test",
) -> List[str]:
    """Accuracy against GFLOPs, one point per depth, one line per eval net (``best`` drawn as
    deployed), each reference net (``references``: name -> accuracy of a plain net) a
    horizontal line with a marker at full-depth FLOPs; returns the legend labels.

    Example:
        >>> import tempfile
        >>> rows = [{"depth": 1, "flops": 1e8}, {"depth": 2, "flops": 2e8}]
        >>> plot_accuracy_vs_flops(rows, {"net": [0.5, 0.7]}, "net", Path(tempfile.mkdtemp()) / "r.png",
        ...                        title="m, cooperative on digits: test split", references={"leader": 0.8})
        ['net (deployed)', 'leader (reference)']
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flops = [r["flops"] / 1e9 for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, acc in test.items():
        ax.plot(flops, acc, "o-" if name == best else "s--", label=f"{name}{' (deployed)' if name == best else ''}")
        for d, (f, a) in enumerate(zip(flops, acc), 1):
            ax.annotate(str(d), (f, a), textcoords="offset points", xytext=(3, -10), fontsize=7)
    for name, acc in (references or {}).items():
        ax.axhline(acc, color="gray", linestyle=":", linewidth=1)
        ax.plot([flops[-1]], [acc], "*", markersize=9, label=f"{name} (reference)")
    ax.set_xlabel("GFLOPs per image")
    ax.set_ylabel(f"{split} accuracy")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    plt.close(fig)
    return labels
