"""train-head across two processes (accelerate's launcher, gloo on the CPU): the run completes, records
both processes, and its head is as good as a one-process head within noise."""

import json
import os
import subprocess
import sys

import pytest


def train(tiny_dir, out, processes):
    args = ["-m", "harness", "train-head", "--target", str(tiny_dir), "--variant", "eagle", "--out", str(out),
            "--prompts", "16", "--max-new-tokens", "16", "--epochs", "3", "--batch-size", "2", "--gen-batch", "8",
            "--device", "cpu", "--threads", "1", "--seed", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "training_log.json").read_text())


@pytest.mark.slow
def test_two_process_head_matches_one_process(tiny_dir, tmp_path):
    one = train(tiny_dir, tmp_path / "one", 1)
    two = train(tiny_dir, tmp_path / "two", 2)
    assert one["processes"] == 1 and two["processes"] == 2
    a, b = one["heldout_accuracy"]["cumulative"][0], two["heldout_accuracy"]["cumulative"][0]
    # same data, same seed; DDP averages the two processes' gradients (twice the batch), so the heads
    # differ, but their held-out depth-1 accuracy agrees within sampling noise of the held-out positions
    n = one["heldout_accuracy"]["positions"]
    noise = 3 * (max(a * (1 - a), 0.05) / max(n, 1)) ** 0.5
    assert abs(a - b) <= noise + 0.05, (a, b, n)
