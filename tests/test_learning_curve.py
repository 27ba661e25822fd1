"""benchmarks/learning_curve.py: the study's core on a tiny config, and its statistics on known numbers."""
import doctest
import json
import math

import pytest
import torch

import learning_curve as lc  # benchmarks/ is on pytest's pythonpath (pyproject.toml)

T_975_2 = 4.302652729911275  # scipy.stats.t.ppf(0.975, 2)


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_docstring_examples():
    assert doctest.testmod(lc).failed == 0


def test_t_interval_known_numbers():
    iv = lc.t_interval([0.1, 0.2, 0.3])
    half = T_975_2 * 0.1 / math.sqrt(3)
    assert iv["n"] == 3 and iv["mean"] == pytest.approx(0.2)
    assert (iv["lo"], iv["hi"]) == (pytest.approx(0.2 - half), pytest.approx(0.2 + half))
    one = lc.t_interval([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["lo"]) and lc.pct(one) == "50.0"


def record(method, size, seed, acc, other=None, section=lc.MAIN):
    r = {"key": lc.run_key(section, method, size, seed), "section": section, "method": method, "size": size,
         "seed": seed, "accuracy": acc, "deployable": "net", "nets_test_accuracy": {"net": acc}, "wall_time_s": 10.0}
    if other is not None:
        r.update(deployable="teammate_a", nets_test_accuracy={"teammate_a": acc, "teammate_b": other}, wall_time_s=30.0)
    return r


def test_paired_differences_use_matching_seeds():
    records = [
        # ekd vs independent at size 50: seeds 0, 1, 2 in both; seed 3 only in independent (must be ignored)
        record("ekd", 50, 0, [0.90, 0.90]), record("ekd", 50, 1, [0.80, 0.80]), record("ekd", 50, 2, [0.85, 0.85]),
        record("independent", 50, 0, [0.88, 0.88]), record("independent", 50, 1, [0.79, 0.79]),
        record("independent", 50, 2, [0.80, 0.80]), record("independent", 50, 3, [0.10, 0.10]),
        # cooperative: deployed teammate_a, other teammate_b
        record("cooperative", 50, 0, [0.92, 0.94], other=[0.88, 0.90]),
        record("cooperative", 50, 1, [0.82, 0.84], other=[0.80, 0.80]),
        record("cooperative", 50, 2, [0.86, 0.86], other=[0.84, 0.88]),
    ]
    res = lc.analyse(records)[lc.MAIN]
    d = res["claims"]["ekd - independent"][50]
    diffs = [0.02, 0.01, 0.05]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 2)
    for iv in (d["mean"], *d["per_depth"]):
        assert iv["seeds"] == [0, 1, 2] and iv["wins"] == 3
        assert iv["mean"] == pytest.approx(mean)
        assert iv["hi"] - iv["mean"] == pytest.approx(T_975_2 * sd / math.sqrt(3))
    summary = res["summary"]
    # the Teammates' mean is the per-depth mean of both nets; the other teammate is reported too
    assert summary[lc.COOP_MEAN][50]["per_depth"][0]["mean"] == pytest.approx((0.90 + 0.81 + 0.85) / 3)
    assert summary[lc.COOP_OTHER][50]["mean"]["mean"] == pytest.approx((0.89 + 0.80 + 0.86) / 3)
    fair = res["cooperative_vs"]["independent"]["teammates_mean"][50]["mean"]  # coop mean 0.91, 0.815, 0.86
    assert fair["seeds"] == [0, 1, 2] and fair["mean"] == pytest.approx((0.03 + 0.025 + 0.06) / 3)
    full = res["claims"][f"{lc.COOP_MEAN} at each depth - independent at full depth (the full net trained alone)"][50]
    assert full["per_depth"][0]["mean"] == pytest.approx((0.02 + 0.02 + 0.05) / 3)  # coop depth 1 - independent depth 2
    assert full["per_depth"][0]["seeds"] == [0, 1, 2]
    sel = res["selection"][50]["mean"]
    assert sel["mean"] == pytest.approx((0.04 + 0.03 + 0.0) / 3) and sel["wins"] == 2
    assert res["cost"]["cooperative"]["relative"] == 1.0 and res["cost"]["ekd"]["relative"] == pytest.approx(1 / 3)
    md = "\n".join(lc.section_markdown(res, full=None))
    assert "+2.7 [" in md and "(3/3)" in md


def test_study_end_to_end(tmp_path, keep_threads):
    out, runs = tmp_path / "out", tmp_path / "runs"
    argv = ["--methods", "cooperative", "multi_exit", "--sizes", "20", "all", "--seeds", "0", "1", "--epochs", "1",
            "--img-size", "8", "--limit-train", "60", "--limit-eval", "32", "--jobs", "1", "--no-exit8",
            "--out", str(out), "--runs-dir", str(runs)]
    assert lc.main(argv) == 0
    data = json.loads((out / "learning_curve.json").read_text())
    assert len(data["runs"]) == 8 and len(list(runs.glob("main/*.json"))) == 8
    assert {(r["method"], r["size"], r["seed"]) for r in data["runs"]} == {
        (m, n, s) for m in ("cooperative", "multi_exit") for n in (20, 60) for s in (0, 1)}
    coop = next(r for r in data["runs"] if r["method"] == "cooperative")
    assert set(coop["nets_test_accuracy"]) == {"teammate_a", "teammate_b"}
    assert coop["accuracy"] == coop["nets_test_accuracy"][coop["deployable"]]
    summary = data["analysis"]["main"]["summary"]
    assert set(summary) == {lc.COOP_DEPLOYED, lc.COOP_OTHER, lc.COOP_MEAN, "multi_exit"}
    for sizes in summary.values():
        assert set(sizes) == {"20", "60"}
        for cell in sizes.values():
            for iv in cell["per_depth"] + [cell["mean"]]:
                assert iv["n"] == 2 and iv["lo"] <= iv["mean"] <= iv["hi"]
    diff = data["analysis"]["main"]["cooperative_vs"]["multi_exit"]["teammates_mean"]["20"]["mean"]
    assert diff["seeds"] == [0, 1]
    md = (out / "learning_curve.md").read_text()
    for text in ("## All methods", "## MLCSD on the 8-exit ResNet-18 layout", lc.HANDWRITTEN, "```\npython benchmarks/",
                 "60 (all)", "Paired differences", "Training cost", "Skipped (`--no-exit8`)"):
        assert text in md
    assert (out / "learning_curve.png").stat().st_size > 0

    # --resume: nothing retrained, the hand-written section kept, the new invocation recorded
    (out / "learning_curve.md").write_text(md.split(lc.HANDWRITTEN)[0] + lc.HANDWRITTEN + "\n\nhand-written.\n")
    assert lc.main(argv + ["--resume"]) == 0
    data = json.loads((out / "learning_curve.json").read_text())
    assert [i["trained"] for i in data["invocations"]] == [8, 0]
    assert (out / "learning_curve.md").read_text().endswith(lc.HANDWRITTEN + "\n\nhand-written.\n")
    with pytest.raises(SystemExit, match="--resume"):  # finished runs are not overwritten silently
        lc.main(argv)


def test_exit_heads_section(tmp_path, keep_threads):
    """``--heads``: every kind trained per backbone with the same seeds, each later kind paired against the first."""
    out, runs = tmp_path / "out", tmp_path / "runs"
    argv = ["--no-main", "--no-exit8", "--heads", "conv", "linear", "--heads-models", "test_resnet",
            "--heads-methods", "multi_exit", "--sizes", "20", "--seeds", "0", "1", "--epochs", "1", "--img-size", "8",
            "--limit-train", "60", "--limit-eval", "32", "--jobs", "1", "--out", str(out), "--runs-dir", str(runs)]
    assert lc.main(argv) == 0
    data = json.loads((out / "learning_curve.json").read_text())
    # cooperative is always run (the reference); every run is in a head section, with its head kind
    assert {(r["section"], r["method"]) for r in data["runs"]} == {
        (f"heads-test_resnet-{k}", m) for k in ("conv", "linear") for m in ("cooperative", "multi_exit")}
    assert all(r["config"]["model_kwargs"] == {"head": r["section"].rsplit("-", 1)[1]} for r in data["runs"])
    res = data["heads_analysis"]["test_resnet"]["multi_exit"]
    assert set(res["summary"]) == {"conv", "linear"}
    diff = res["minus_first"]["linear"]["20"]
    assert diff["mean"]["seeds"] == [0, 1] and len(diff["per_depth"]) == 4
    runs_by = {(r["section"], r["seed"]): r["accuracy"] for r in data["runs"] if r["method"] == "multi_exit"}
    expected = sum(runs_by[("heads-test_resnet-linear", s)][0] - runs_by[("heads-test_resnet-conv", s)][0]
                   for s in (0, 1)) / 2
    assert diff["per_depth"][0]["mean"] == pytest.approx(expected)
    assert data["analysis"] == {}  # no main study
    md = (out / "learning_curve.md").read_text()
    assert "## Exit heads" in md and "`linear` minus `conv`" in md and "`conv` = conv" in md
