"""benchmarks/harness.py: command line, statistics on known numbers, interleaving order, Markdown and files."""
import doctest
import json
import math
from pathlib import Path

import pytest

import harness

T_975_2 = 4.302652729911275  # scipy.stats.t.ppf(0.975, 2)


def test_docstring_examples():
    assert doctest.testmod(harness).failed == 0


def test_command_line_is_quoted_and_relative_to_the_repo():
    script = harness.REPO / "benchmarks" / "x.py"
    assert harness.command_line(script, ["--a", "b c", "it's"]) == "python benchmarks/x.py --a 'b c' 'it'\"'\"'s'"
    assert harness.command_line("/elsewhere/y.py", []) == "python /elsewhere/y.py"


def test_machine_record_and_sentence():
    m = harness.machine()
    assert isinstance(m["cores"], int) and m["torch"] and m["timm"] and m["python"].count(".") == 2
    text = harness.describe_machine(m, load=[0.5, 1.25])
    assert text.startswith(m["cpu"]) and f"torch {m['torch']}" in text and "0.50 at the start, 1.25 at the end" in text
    # an older result's record (strings, fewer keys) and a written sentence still render
    old = {"cpu": "Xeon", "cores": "2", "torch_threads": "1", "torch": "2.5", "timm": "1.0", "python": "3.11"}
    assert harness.describe_machine(old) == "Xeon, 2 CPU cores visible, 1 torch thread(s); torch 2.5, timm 1.0, Python 3.11."
    assert harness.describe_machine("x86_64, 2 cores") == "x86_64, 2 cores"


def test_median_interval_known_numbers():
    iv = harness.median_interval([10, 1, 9, 2, 8, 3, 7, 4, 6, 5])
    # n=10: P(B<=1) = 11/1024 -> k=2 covers 1 - 22/1024; k=3 would cover only 1 - 112/1024 < 0.95
    assert (iv["median"], iv["lo"], iv["hi"], iv["n"]) == (5.5, 2, 9, 10)
    assert iv["level"] == pytest.approx(1 - 22 / 1024)
    small = harness.median_interval([3.0, 1.0, 2.0])  # too few for 95 %: the range, with its real coverage
    assert (small["lo"], small["hi"], small["level"]) == (1.0, 3.0, 0.75)
    lower = harness.median_interval(range(1, 11), level=0.8)
    assert (lower["lo"], lower["hi"]) == (3, 8) and lower["level"] == pytest.approx(1 - 112 / 1024)
    one = harness.median_interval([4.0])
    assert (one["median"], one["lo"], one["hi"], one["level"]) == (4.0, 4.0, 4.0, 0.0)
    assert math.isnan(harness.median_interval([])["median"])


def test_t_interval_and_paired_difference():
    iv = harness.t_interval([0.1, 0.2, 0.3])
    half = T_975_2 * 0.1 / math.sqrt(3)
    assert iv["mean"] == pytest.approx(0.2) and iv["hi"] - iv["mean"] == pytest.approx(half)
    assert iv["mean"] - iv["lo"] == pytest.approx(half) and iv["n"] == 3
    assert math.isnan(harness.t_interval([1.0])["lo"])
    d = harness.paired_difference({0: 0.9, 1: 0.8, 2: 0.85, 5: 1.0}, {0: 0.88, 1: 0.81, 2: 0.80, 3: 0.1})
    assert d["seeds"] == [0, 1, 2] and d["wins"] == 2 and d["mean"] == pytest.approx((0.02 - 0.01 + 0.05) / 3)
    assert harness.mean_std([2.0, 4.0]) == (3.0, pytest.approx(math.sqrt(2)))
    assert harness.ratio_interval([2.0, 6.0, 3.0], [1.0, 2.0, 3.0])["median"] == 2.0
    with pytest.raises(ValueError):
        harness.paired_ratios([1.0], [1.0, 2.0])


class FakeClock:
    """A clock that each variant advances by its own duration, and a log of the calls."""

    def __init__(self, durations):
        self.now, self.durations, self.log, self.load = 0.0, durations, [], [1, 3, 2, 5, 1, 4]

    def __call__(self):
        return self.now

    def fn(self, name):
        def run():
            self.log.append(name)
            # the machine's load changes every third call (from round to round of three variants)
            self.now += self.durations[name] * self.load[(len(self.log) - 1) // 3 % len(self.load)]
        return run


class FakeBar:
    def __init__(self):
        self.n, self.postfix = 0, []

    def update(self, k):
        self.n += k

    def set_postfix_str(self, text):
        self.postfix.append(text)


def test_interleaved_order_alternates_and_ratios_are_paired():
    clock = FakeClock({"a": 1.0, "b": 2.0, "c": 4.0})
    bar = FakeBar()
    t = harness.time_interleaved({n: clock.fn(n) for n in "abc"}, repeats=4, warmup=2, timer=clock, bar=bar,
                                 first_warmup_units=10)
    assert clock.log[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up, in the given order
    assert t.calls == list("abc" "cba" "abc" "cba") and clock.log[6:] == t.calls
    assert {n: len(v) for n, v in t.warmup.items()} == {"a": 2, "b": 2, "c": 2}
    assert bar.n == 3 * (10 + 1) + 12 and bar.postfix[-1] == "round 4/4"
    # the load differs from round to round, but the calls of one round share it: the paired ratios are exact
    assert t.times["a"] == [2.0, 5.0, 1.0, 4.0] and t.times["c"] == [8.0, 20.0, 4.0, 16.0]
    assert t.ratios("a", "c") == [0.25] * 4 and t.ratio("a", "c")["median"] == 0.25
    assert t.median("b") == 6.0
    iv = t.interval("b")  # n=4: only the range, covering 1 - 2/16
    assert (iv["lo"], iv["hi"], iv["n"], iv["level"]) == (2.0, 10.0, 4, 0.875)
    with pytest.raises(ValueError, match="reference"):
        t.ratio("a")


def test_interleaved_with_a_reference_between_every_two():
    clock = FakeClock({"p": 1.0, "x": 3.0, "y": 5.0})
    t = harness.time_interleaved({"x": clock.fn("x"), "p": clock.fn("p"), "y": clock.fn("y")}, repeats=2, warmup=1,
                                 reference="p", timer=clock)
    assert t.names == ["p", "x", "y"]  # the reference first
    assert clock.log[:3] == ["p", "x", "y"] and t.calls == "p x p y p p y p x p".split()
    p = t.times["p"]
    assert len(p) == 6 and len(t.times["x"]) == len(t.times["y"]) == 2
    assert t.before["x"] == [p[0], p[4]] and t.after["x"] == [p[1], p[5]]
    assert t.before["y"] == [p[1], p[3]] and t.after["y"] == [p[2], p[4]]
    expected = [tx / ((b + a) / 2) for tx, b, a in zip(t.times["x"], t.before["x"], t.after["x"])]
    assert t.ratios("x") == expected and t.ratio("p")["median"] == 1.0
    back = json.loads(json.dumps(t.to_dict()))
    assert harness.Timings(**back) == t


def test_markdown_table_and_intervals():
    text = harness.markdown_table(["a", "b", "c"], [[1, "x|y"], ["p", "q", 2.5]])
    assert text == "| a | b | c |\n|---|---|---|\n| 1 | x\\|y |  |\n| p | q | 2.5 |"
    assert harness.markdown_table(["a"], [["x|y"]], escape=False).endswith("| x|y |")
    with pytest.raises(ValueError):
        harness.markdown_table(["a"], [[1, 2]])
    iv = harness.median_interval([0.98, 1.0, 1.01, 1.02, 1.03, 1.05, 1.07])
    assert harness.format_interval(iv) == "1.02 [0.98, 1.07]"
    assert harness.format_interval({"mean": -0.012, "lo": -0.02, "hi": 0.001}, "{:.1f}", 100, signed=True) == \
        "-1.2 [-2.0, +0.1]"


def test_report_files_and_json_round_trip(tmp_path):
    r = harness.Report.start("demo", "Demo benchmark", harness.REPO / "benchmarks" / "demo.py", ["--n", "3"])
    r.finish()
    assert r.command == "python benchmarks/demo.py --n 3" and len(r.load) == 2 and r.elapsed_s >= 0
    r.heading("Results")
    r.text("Some text.")
    r.table(["x", "y"], [[1, 2]])
    r.bullets(["one", "two"])
    r.image("demo.png", "plot")
    r.note("A hand-written note.")
    plt = harness.pyplot()
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    paths = r.write(tmp_path, data={"values": [1.0, float("nan")], "where": Path("/x")}, figure=fig)
    assert set(paths) == {"md", "json", "png"} and paths["png"].stat().st_size > 0
    md = paths["md"].read_text()
    assert md.startswith("# Demo benchmark\n\nCommand:\n\n```\npython benchmarks/demo.py --n 3\n```\n\nMachine: ")
    assert "\n\n## Results\n\nSome text.\n\n| x | y |\n|---|---|\n| 1 | 2 |\n\n- one\n- two\n\n![plot](demo.png)" in md
    assert md.endswith("\n\n## Notes\n\nA hand-written note.\n") and "Ran 0.0 min." in md
    data = json.loads(paths["json"].read_text())
    assert data["values"] == [1.0, None] and data["where"] == "/x" and data["command"] == r.command
    assert data["machine"] == json.loads(json.dumps(r.machine)) and data["load"] == r.load
    again = harness.Report.from_meta("demo", "Demo benchmark", data)
    assert again.header() == r.header()
    old = harness.Report.from_meta("demo", "Old", {"command": "python x.py", "machine": {"cpu": "C"}, "elapsed_min": 2})
    assert old.header().endswith("Machine: C. Ran 2.0 min.")
