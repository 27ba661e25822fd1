"""benchmarks/train_throughput.py: its core on a tiny model, the report's structure and how ratios are computed."""
import json
import statistics

import pytest
import torch

import train_throughput as tt  # benchmarks/ is on pytest's pythonpath (pyproject.toml)


@pytest.fixture
def keep_torch_settings():
    threads, limit = torch.get_num_threads(), torch._dynamo.config.cache_size_limit
    yield
    torch.set_num_threads(threads)
    torch._dynamo.config.cache_size_limit = limit


def test_tiny_run(tmp_path, keep_torch_settings, capsys):
    recipes = ["multi_exit", "cooperative_fixed"]
    assert tt.main(["--model", "test_resnet", "--img-size", "16", "--batch-size", "4", "--steps", "2", "--warmup", "1",
                    "--options", "base", "--recipes", *recipes, "--out", str(tmp_path), "--quiet"]) == 0
    res = json.loads((tmp_path / "train_throughput.json").read_text())
    assert res["options"] == ["base"] and res["recipes"] == recipes and res["batch_size"] == 4
    assert res["nets"]["plain"]["backbone"] == "test_resnet" and res["nets"]["plain"]["num_depths"] == 4
    # a fixed Leader is frozen: the recipe holds three nets, two of them trained
    coop = res["nets"]["cooperative_fixed"]
    assert coop["trainable_params"] < coop["params"]
    rows = res["sets"]["base"]["rows"]
    assert list(rows) == ["plain", *recipes]
    plain = rows["plain"]["times_s"]
    # 2 rounds of plain, r1, plain, r2, plain: 3 plain steps a round, each recipe step between two of them
    assert len(plain) == 2 * 3 and len(rows["plain"]["warmup_s"]) == 1
    for name in recipes:
        row = rows[name]
        assert len(row["times_s"]) == 2 and len(row["warmup_s"]) == 1 and all(t > 0 for t in row["times_s"])
        assert set(row["plain_before_s"] + row["plain_after_s"]) <= set(plain)
        med = statistics.median(row["times_s"])
        assert row["median_s"] == pytest.approx(med) and row["images_per_s"] == pytest.approx(4 / med)
        assert row["ratio_of_medians"] == pytest.approx(med / statistics.median(plain))
        ratios = [t / ((b + a) / 2) for t, b, a in zip(row["times_s"], row["plain_before_s"], row["plain_after_s"])]
        assert row["ratio"] > 0 and row["ratio"] == pytest.approx(statistics.median(ratios))
    # the recipes' neighbours: round 1 in order, round 2 reversed, each plain step shared by its two neighbours
    first, second = rows[recipes[0]], rows[recipes[1]]
    assert first["plain_before_s"][0] == plain[0] and first["plain_after_s"][0] == second["plain_before_s"][0]
    assert second["plain_before_s"][1] == plain[3] and second["plain_after_s"][1] == first["plain_before_s"][1]
    assert rows["plain"]["ratio"] == pytest.approx(1.0)

    md = (tmp_path / "train_throughput.md").read_text()
    assert "--model test_resnet" in md and res["machine"]["torch"] in md and res["machine"]["timm"] in md
    table = md.split("## Step time relative to the plain timm step")[1].split("##")[0]
    lines = [line for line in table.splitlines() if line.startswith("| `")]
    assert [line.split("`")[1] for line in lines] == ["plain", *recipes]
    assert f"{rows['multi_exit']['ratio']:.2f}x" in lines[1] and "<= 1.15x" in lines[1]
    assert f"{rows['cooperative_fixed']['ratio']:.2f}x" in lines[2] and "<= 2.5x" in lines[2]
    targets = md.split("## Targets")[1].split("##")[0]
    for name in recipes:
        reached = rows[name]["ratio"] <= tt.TARGETS[name]
        assert f"`{name}` <= {tt.TARGETS[name]}x plain: base {rows[name]['ratio']:.2f}x (" \
               f"{'reached' if reached else '**not reached**'})" in targets
    check = md.split("## Check: ratio of medians")[1].split("##")[0]
    assert [line.count("|") for line in check.splitlines() if line.startswith("|")] == [3, 3, 3, 3]
    assert (tmp_path / "train_throughput.png").stat().st_size > 0
    assert "Compile time" not in md  # no compiled option set was run

    # re-rendering from the JSON gives the same report, plus notes
    notes = tmp_path / "notes.md"
    notes.write_text("Hand-written note.")
    out2 = tmp_path / "again"
    assert tt.main(["--from-json", str(tmp_path / "train_throughput.json"), "--notes", str(notes),
                    "--out", str(out2)]) == 0
    again = (out2 / "train_throughput.md").read_text()
    assert again.startswith(md.split("## Notes")[0].split("![")[0]) and "## Notes\n\nHand-written note." in again
