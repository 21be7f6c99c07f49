"""Nothing lost, nothing silently wrong (issue 19): overwrites that replace only what they write, saves that
survive a kill at any point, training that checkpoints on SIGTERM and a second Ctrl-C, and bad values that
raise or warn instead of computing something else."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peftfast
from peftfast import LoraConfig
from peftfast.cli import main as cli_main

from tiny import tiny_llama

FAST = ["--seq-len", "32", "--batch-size", "4", "--logging-steps", "100"]


def _patched(r=2, seed=0):
    model = tiny_llama()
    torch.manual_seed(seed)
    peftfast.patch(model, LoraConfig(r=r, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model


def _rank_on_disk(path: Path) -> int:
    """The rank the config claims, after checking the weights agree with it (loading raises otherwise)."""
    peftfast.load_adapter(tiny_llama(), str(path))
    return json.loads((path / "adapter_config.json").read_text())["r"]


# ---------------------------------------------------------------------------------------------------
# 1. merge --overwrite replaces only what it writes, and never its own input
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from peftfast.train import main as train_main

    out = tmp_path_factory.mktemp("run") / "lora"
    train_main(["--max-steps", "2", "--method", "lora", "--save-steps", "1", "--output", str(out), *FAST])
    return out


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_merge_refuses_to_overwrite_its_own_adapter(lora_run, tmp_path, capsys):
    before = _tree(lora_run)
    rc = cli_main(["merge", "--adapter", str(lora_run), "--output", str(lora_run), "--overwrite"])
    assert rc == 2
    assert "is the --adapter directory" in capsys.readouterr().err
    assert _tree(lora_run) == before
    # nor a folder that holds the adapter
    rc = cli_main(["merge", "--adapter", str(lora_run), "--output", str(lora_run.parent), "--overwrite"])
    assert rc == 2 and "holds the --adapter directory" in capsys.readouterr().err
    assert _tree(lora_run) == before


def test_merge_overwrite_keeps_files_it_did_not_write(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"an older merge's shard")
    assert cli_main(["merge", "--adapter", str(lora_run), "--output", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "model-00001-of-00002.safetensors").exists()  # replaced by this merge's weights
    AutoModelForCausalLM.from_pretrained(str(out))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".peftfast")]


# ---------------------------------------------------------------------------------------------------
# 2. re-saving an adapter survives a kill at any point
# ---------------------------------------------------------------------------------------------------

class _Killed(BaseException):
    """The process dying: nothing after it runs, not even cleanup."""


def _die_at(monkeypatch, k: int) -> list:
    """Make the k-th filesystem change (rename, replace, unlink, rmdir, rmtree, exchange) and all later
    ones kill the 'process' before they happen."""
    import peftfast.fileio as fileio

    calls = []

    def wrap(fn):
        def mutation(*a, **kw):
            calls.append(fn.__name__)
            if len(calls) >= k:
                raise _Killed
            return fn(*a, **kw)
        return mutation

    for mod, name in ((os, "rename"), (os, "replace"), (os, "unlink"), (os, "rmdir"), (shutil, "rmtree")):
        monkeypatch.setattr(mod, name, wrap(getattr(mod, name)))
    if hasattr(fileio, "_exchange"):
        monkeypatch.setattr(fileio, "_exchange", wrap(fileio._exchange))
    return calls


def test_resave_killed_at_any_point_leaves_one_whole_adapter_and_loses_nothing(tmp_path, monkeypatch):
    import peftfast.fileio as fileio

    path = tmp_path / "adapter"
    new = _patched(r=4, seed=1)
    for k in range(1, 30):
        if path.exists():
            shutil.rmtree(path)
        peftfast.save_adapter(_patched(r=2), path)
        (path / "train_log.json").write_text("{}")
        with monkeypatch.context() as m:
            calls = _die_at(m, k)
            try:
                peftfast.save_adapter(new, path)
                finished = True
            except _Killed:
                finished = False
        getattr(fileio, "_ACTIVE", set()).clear()  # the killed process is gone
        assert _rank_on_disk(path) in (2, 4), f"killed at change {k} ({calls[-1]})"
        # the next save finishes or removes what the killed one left, and nothing is lost
        peftfast.save_adapter(new, path)
        assert _rank_on_disk(path) == 4
        assert (path / "train_log.json").read_text() == "{}", f"killed at change {k} ({calls[-1]})"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"], f"killed at change {k}"
        if finished:
            break
    assert finished


def test_saved_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        peftfast.save_adapter(_patched(), tmp_path / "a")
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o755
    for f in (tmp_path / "a").iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f.name


# ---------------------------------------------------------------------------------------------------
# 3. SIGTERM checkpoints like Ctrl-C; a second Ctrl-C cannot cut the emergency checkpoint
# ---------------------------------------------------------------------------------------------------

def test_second_ctrl_c_during_the_emergency_checkpoint_keeps_it(tmp_path, monkeypatch, capsys):
    import peftfast.resume as resume
    import peftfast.train as train_mod

    def hook(step):
        if step == 3:
            raise KeyboardInterrupt

    real = resume.flatten_optimizer

    def impatient(opt):
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C again while the checkpoint is written
        return real(opt)

    monkeypatch.setattr(train_mod, "_before_step", hook)
    monkeypatch.setattr(resume, "flatten_optimizer", impatient)
    out = tmp_path / "run"
    try:
        rc = cli_main(["train", "--max-steps", "4", "--save-steps", "100", "--output", str(out), *FAST])
    except KeyboardInterrupt:
        pytest.fail("the second Ctrl-C cut the emergency checkpoint short")
    assert rc == 130
    assert [p.name for p in out.iterdir()] == ["checkpoint-2"]
    assert (out / "checkpoint-2" / "training_state.safetensors").is_file()


def test_sigterm_writes_a_resumable_checkpoint(tmp_path):
    out = tmp_path / "run"
    script = (
        "import os, signal, sys\n"
        "import peftfast.train as t\n"
        "t._before_step = lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == 3 else None\n"
        "from peftfast.cli import main\n"
        f"sys.exit(main(['train', '--max-steps', '4', '--output', {str(out)!r}, *{FAST!r}]))\n"
    )
    env = dict(os.environ, PEFTFAST_BACKEND="reference")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert (out / "checkpoint-2" / "training_state.json").is_file()
    assert "checkpoint of step 2/4" in proc.stdout


# ---------------------------------------------------------------------------------------------------
# 4. an empty path, and a README.md peftfast did not write
# ---------------------------------------------------------------------------------------------------

def test_save_adapter_refuses_an_empty_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("my project")
    with pytest.raises(ValueError, match="path is empty"):
        peftfast.save_adapter(_patched(), "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
    assert (tmp_path / "README.md").read_text() == "my project"


def test_save_adapter_keeps_a_foreign_readme_and_replaces_its_own(tmp_path):
    (tmp_path / "README.md").write_text("my project")
    peftfast.save_adapter(_patched(), tmp_path)
    assert (tmp_path / "README.md").read_text() == "my project"
    assert _rank_on_disk(tmp_path) == 2
    other = tmp_path / "b"
    peftfast.save_adapter(_patched(), other)
    (other / "README.md").write_text((other / "README.md").read_text().replace("lora", "LORA-OLD"))
    peftfast.save_adapter(_patched(), other)
    assert "LORA-OLD" not in (other / "README.md").read_text()
