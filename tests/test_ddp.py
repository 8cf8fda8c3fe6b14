"""DDP (2 CPU processes, gloo): every rank holds identical covariances, selections, weights and class statistics,
and the prefix cache (each rank storing the samples of its own shard) gives the uncached run's weights."""

import os
import subprocess
import sys

import torch


def test_ddp_ranks_agree(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "ddp_run.py")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True, text=True, timeout=600,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert states[0]["world_size"] == 2
    first, second = states[0]["learner"], states[1]["learner"]
    assert first["tasks_seen"] == second["tasks_seen"] == 2
    assert first["covariances"].keys() == second["covariances"].keys() and first["covariances"]
    for name in first["covariances"]:
        assert torch.equal(first["covariances"][name], second["covariances"][name]), name
        assert torch.equal(first["selected"][name], second["selected"][name]), name
    for key, value in states[0]["model"].items():
        assert torch.equal(value, states[1]["model"][key]), key
    # the statistics head summed both ranks' shards: every training sample counted once, on both ranks
    stats = [s["statistics"] for s in states]
    assert stats[0]["counts"].sum().item() == states[0]["samples"] and stats[0]["classes"].tolist() == [0, 1, 2, 3]
    for key in ("classes", "counts", "means", "scatter"):
        assert torch.allclose(stats[0][key].double(), stats[1][key].double()), key

    # the prefix cache under DDP: each rank stores its shard's samples by their index in the whole dataset, reads
    # the batches it has all of, and ends with the uncached run's weights, the same on both ranks
    for state in states:
        runs = state["prefix_cache"]
        assert runs["off"]["reports"] == [{}, {}]
        base, task = runs["on"]["reports"]
        assert base == {} and task["cut"] and task["reason"] == "" and task["hits"] > 0
        for key, value in runs["off"]["model"].items():
            assert torch.equal(runs["on"]["model"][key], value), key
            assert torch.equal(states[1]["prefix_cache"]["on"]["model"][key], value), key
