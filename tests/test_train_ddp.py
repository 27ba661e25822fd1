"""Multi-process training (issue 3): two gloo processes end with identical weights; only rank 0 writes.

The test launches this file under ``torch.distributed.run``; each rank trains the tiny
config and saves its own recipe state to ``<dir>/rank<R>.pt`` for the comparison.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EPOCHS = 2


def _worker(out: Path) -> None:
    from coopnets.train import TrainConfig, Trainer

    torch.set_num_threads(1)
    cfg = TrainConfig(out=str(out / "run"), model="test_resnet", method="cooperative", epochs=EPOCHS, img_size=16,
                      limit_train=64, limit_eval=32, batch_size=16, device="cpu", progress=False, profile_repeats=1,
                      checkpoint_hist=0)  # the last epoch's weights on every rank (best-epoch restore is rank 0's)
    trainer = Trainer(cfg, echo=False)
    trainer.fit()
    torch.save(trainer.recipe.state_dict(), out / f"rank{trainer.dist.rank}.pt")


@pytest.mark.slow
def test_two_gloo_processes_hold_identical_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"ranks differ in {differ[:5]}"
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("epoch") for r in lines] == [1, 2, None], "metrics written by more than one rank"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["world_size"] == 2


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
