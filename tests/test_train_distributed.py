"""`peftfast train` under torchrun (accelerate launch needs GPUs or MPI for several processes; it sets the
same environment variables, so it is not run here): 2 CPU processes (gloo) with --batch-size 2 each take the same steps
as one process with --batch-size 4 — same losses and adapter — and only rank 0 writes the output."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import rel_err

ARGS = ["--method", "lora", "--max-steps", "3", "--seq-len", "48", "--lr", "1e-2",
        "--eval-fraction", "0.1", "--logging-steps", "1", "--save-steps", "2"]


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_processes_match_one(tmp_path, launcher):
    from peftfast.cli.train import main

    single = main(ARGS + ["--batch-size", "4", "--output", str(tmp_path / "single")])
    env = dict(os.environ, PEFTFAST_BACKEND="reference", TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    cmd = [sys.executable, *LAUNCHERS[launcher], "-m", "peftfast", "train", *ARGS, "--batch-size", "2", "--output", str(tmp_path / "ddp")]
    # cwd outside the repository: the repo root on sys.path would expose kernels/ as a top-level package
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("adapter saved to") == 1, "only rank 0 prints"
    log = json.loads((tmp_path / "ddp" / "train_log.json").read_text())
    for a, b in zip(log["losses"], single["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b), (log["losses"], single["losses"])
    assert abs(log["eval_loss"] - single["eval_loss"]) <= 1e-5 * abs(single["eval_loss"])
    ours = load_file(tmp_path / "ddp" / "adapter_model.safetensors")
    ref = load_file(tmp_path / "single" / "adapter_model.safetensors")
    assert ours.keys() == ref.keys()
    for k in ref:
        assert rel_err(ours[k], ref[k]) < 1e-5, k
    assert sorted(p.name for p in (tmp_path / "ddp").glob("checkpoint-*")) == ["checkpoint-3"]
