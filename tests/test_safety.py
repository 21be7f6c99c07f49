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
    from peftfast.cli.train import main as train_main

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


_SAVE_LOOP = """
import sys, torch, peftfast
from peftfast import LoraConfig
from tiny import tiny_llama
path = sys.argv[1]
models = []
for r, seed in ((2, 0), (4, 1)):
    m = tiny_llama()
    torch.manual_seed(seed)
    peftfast.patch(m, LoraConfig(r=r, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    models.append(m)
print("saving", flush=True)
i = 0
while True:
    peftfast.save_adapter(models[i % 2], path)
    i += 1
"""


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.45, 0.8])
def test_real_sigkill_during_resaves_leaves_one_whole_adapter(tmp_path, delay):
    """A real SIGKILL (no Python cleanup runs) at some moment of a process that re-saves an adapter over and
    over: what is on disk loads as one of the two adapters, and the next save recovers the rest."""
    import time

    path = tmp_path / "adapter"
    peftfast.save_adapter(_patched(r=2), path)
    (path / "train_log.json").write_text("{}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-c", _SAVE_LOOP, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "saving"
        time.sleep(delay)
        assert child.poll() is None, "the saving process died on its own"
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert _rank_on_disk(path) in (2, 4)
    peftfast.save_adapter(_patched(r=4, seed=1), path)
    assert _rank_on_disk(path) == 4
    assert (path / "train_log.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def _age(path: Path, seconds: float) -> None:
    old = path.stat().st_mtime - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (old, old))


def test_stale_staging_directories_of_older_versions_are_cleaned(tmp_path):
    """Older versions staged saves in mkdtemp directories (``.peftfast-save-XXXXXXXX`` beside an adapter,
    ``.checkpoint-N-XXXXXXXX`` in a run, ``.peftfast-merge-XXXXXXXX``). A killed one's partial write goes at
    the next save; one that may hold a complete save, or that a writer may still be filling, stays."""
    from safetensors.torch import save_file

    path = tmp_path / "adapter"
    partial = {}
    for name in (".peftfast-save-ab12cd_9", ".checkpoint-7-q0w9e8r7", ".peftfast-merge-zz00zz00"):
        d = tmp_path / name
        d.mkdir()
        save_file({"w": torch.randn(64, 64)}, str(d / "adapter_model.safetensors"))
        data = (d / "adapter_model.safetensors").read_bytes()
        (d / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])  # killed mid-write
        _age(d, 3600)
        partial[name] = d
    complete = tmp_path / ".peftfast-save-k1ll3d00"
    complete.mkdir()
    save_file({"w": torch.randn(4, 4)}, str(complete / "adapter_model.safetensors"))
    _age(complete, 3600)
    busy = tmp_path / ".peftfast-save-w0rk1ng0"  # an older version's save in progress right now
    busy.mkdir()
    (busy / "adapter_model.safetensors").write_bytes(b"partial")
    unrelated = tmp_path / ".peftfast-save-notes"  # not an mkdtemp name: not ours to judge
    unrelated.mkdir()
    _age(unrelated, 3600)

    with pytest.warns(UserWarning, match="k1ll3d00.*older peftfast.*only copy"):
        peftfast.save_adapter(_patched(), path)
    assert not any(d.exists() for d in partial.values())
    assert complete.is_dir() and busy.is_dir() and unrelated.is_dir()
    assert _rank_on_disk(path) == 2


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
    import peftfast.cli.resume as resume
    import peftfast.cli.train as train_mod

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
        "import peftfast.cli.train as t\n"
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


# ---------------------------------------------------------------------------------------------------
# 6, 7, 9: configs that would silently mean something else
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("targets", ["all-linear", r".*\.q_proj"])
def test_layers_to_transform_with_a_string_target_is_refused(targets):
    with pytest.raises(peftfast.ConfigError, match="layers_to_transform cannot be used with target_modules"):
        LoraConfig(target_modules=targets, layers_to_transform=[0]).validate()
    model = tiny_llama()
    with pytest.raises(peftfast.ConfigError, match="layers_to_transform"):
        peftfast.patch(model, {"peft_type": "LORA", "target_modules": targets, "layers_to_transform": [0]})
    assert not hasattr(model, "peftfast_state")


def test_layers_to_transform_out_of_range_is_named():
    with pytest.raises(peftfast.ConfigError, match=r"none in layers_to_transform=\[7\]; the layer indices here are \[0, 1\]"):
        peftfast.patch(tiny_llama(), LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))


@pytest.mark.parametrize("field,value", [("use_rslora", "false"), ("lora_alpha", "16"), ("r", "8"),
                                         ("lora_dropout", "0.1"), ("use_dora", 0), ("fan_in_fan_out", "no")])
def test_config_values_of_the_wrong_json_type_are_refused_by_name(tmp_path, field, value):
    path = tmp_path / "adapter"
    peftfast.save_adapter(_patched(), path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg[field] = value
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    model = tiny_llama()
    with pytest.raises(peftfast.ConfigError, match=rf"LoraConfig\.{field} must be"):
        peftfast.load_adapter(model, path)
    assert not hasattr(model, "peftfast_state")


def test_numbers_as_python_allows_them_still_load():
    cfg = peftfast.as_config({"peft_type": "LORA", "lora_alpha": 16.0, "lora_dropout": 0, "r": 4})
    assert cfg.lora_alpha == 16.0 and cfg.lora_dropout == 0


def test_zero_alpha_is_refused():
    with pytest.raises(peftfast.ConfigError, match="lora_alpha must be a non-zero"):
        LoraConfig(lora_alpha=0).validate()
    with pytest.raises(peftfast.ConfigError, match=r"alpha_pattern\['q_proj'\]"):
        LoraConfig(alpha_pattern={"q_proj": 0}).validate()


def test_pattern_keys_that_match_no_target_warn():
    with pytest.warns(UserWarning, match=r"rank_pattern keys \['q_prj'\] match none"):
        peftfast.patch(tiny_llama(), LoraConfig(target_modules=["q_proj"], rank_pattern={"q_prj": 4}))
    with pytest.warns(UserWarning, match=r"alpha_pattern keys \['o_proj'\] match none"):
        peftfast.patch(tiny_llama(), LoraConfig(target_modules=["q_proj"], alpha_pattern={"o_proj": 4}))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = peftfast.patch(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 4}))
    assert model.model.layers[0].self_attn.q_proj.r["default"] == 4


# ---------------------------------------------------------------------------------------------------
# 8, 10: the meta device, another base, NaN/Inf
# ---------------------------------------------------------------------------------------------------

def test_load_into_a_meta_model_is_refused(tmp_path):
    from tiny import tiny_llama as build

    path = tmp_path / "adapter"
    peftfast.save_adapter(_patched(), path)
    with torch.device("meta"):
        model = build()
    with pytest.raises(peftfast.AdapterLoadError, match="meta device"):
        peftfast.load_adapter(model, path)
    assert not hasattr(model, "peftfast_state")


def test_patch_of_a_meta_model_is_refused_and_changes_nothing():
    from tiny import tiny_llama as build

    with torch.device("meta"):
        model = build()
    before = {n: (type(m), m) for n, m in model.named_modules()}
    with pytest.raises(peftfast.ConfigError, match="meta device.*uninitialized.*then patch"):
        peftfast.patch(model, LoraConfig(target_modules=["q_proj"]))
    assert not hasattr(model, "peftfast_state")
    assert {n: (type(m), m) for n, m in model.named_modules()} == before


def test_save_of_an_adapter_moved_to_meta_is_refused(tmp_path):
    model = _patched()
    model.to("meta")
    with pytest.raises(ValueError, match="meta device"):
        peftfast.save_adapter(model, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_adapter_for_another_base_warns(tmp_path):
    path = tmp_path / "adapter"
    peftfast.save_adapter(_patched(), path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "org/other-model"
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    model = tiny_llama()
    model.config._name_or_path = "/models/models--org--my-model/snapshots/abc123"
    with pytest.warns(UserWarning, match="made for base model 'org/other-model'"):
        peftfast.load_adapter(model, path)
    cfg["base_model_name_or_path"] = "org/my-model"  # the same model, from the Hub cache: no warning
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    import warnings

    model = tiny_llama()
    model.config._name_or_path = "/models/models--org--my-model/snapshots/abc123"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        peftfast.load_adapter(model, path)


def test_nan_adapter_warns_on_save_and_load(tmp_path):
    model = _patched()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        peftfast.save_adapter(model, tmp_path / "a")
    with pytest.warns(RuntimeWarning, match="NaN or Inf.*q_proj.lora_B"):
        peftfast.load_adapter(tiny_llama(), tmp_path / "a")


def test_max_steps_zero_is_refused(tmp_path, capsys):
    rc = cli_main(["train", "--max-steps", "0", "--output", str(tmp_path / "o"), *FAST])
    assert rc == 2 and "--max-steps must be at least 1" in capsys.readouterr().err
    rc = cli_main(["train", "--lr", "nan", "--output", str(tmp_path / "o"), *FAST])
    assert rc == 2 and "--lr must be a positive number, got nan" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_training_that_makes_the_adapter_nan_stops_before_saving_it(tmp_path, monkeypatch, capsys):
    real = torch.optim.AdamW.step

    def overflowing(self, *a, **k):
        out = real(self, *a, **k)
        if self.state and next(iter(self.state.values()))["step"] >= 2:  # step 2 overflows
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing)
    out = tmp_path / "run"
    rc = cli_main(["train", "--method", "lora", "--max-steps", "4", "--save-steps", "1", "--output", str(out), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "weights hold NaN/Inf after step 2" in err and "checkpoint-1" in err
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]
    assert not (out / "adapter_model.safetensors").exists()


def test_nan_in_the_base_is_not_blamed_on_the_learning_rate(tmp_path, monkeypatch, capsys):
    import peftfast.cli.train as train_mod

    real = train_mod._load_model

    def damaged(a, device):
        loaded = real(a, device)
        with torch.no_grad():
            loaded["model"].model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
        return loaded

    monkeypatch.setattr(train_mod, "_load_model", damaged)
    rc = cli_main(["train", "--method", "lora", "--max-steps", "2", "--output", str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "base model's weights hold NaN/Inf" in err and "--lr" not in err


# ---------------------------------------------------------------------------------------------------
# Unclear: one line where a traceback was
# ---------------------------------------------------------------------------------------------------

def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [l for l in err if l.startswith(f"peftfast {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in "\n".join(err), err
    return lines[0]


@pytest.mark.parametrize("suffix,content,wanted", [
    (".txt", b"good line\nbad \xff byte\n", ":2: not valid UTF-8 (byte 0xff at column 5)"),
    (".jsonl", b'{"text": "a"}\n{"text": "\xc3("}\n', ":2: not valid UTF-8"),
    (".txt", b"GIF89a\n\x01\x00\x01\x00\x80\x00", ":2: holds NUL bytes; this is a binary file"),
])
def test_undecodable_data_names_the_line(tmp_path, capsys, suffix, content, wanted):
    data = tmp_path / f"d{suffix}"
    data.write_bytes(content)
    assert cli_main(["train", "--data", str(data), "--output", str(tmp_path / "o"), *FAST]) == 2
    assert wanted in _one_error_line(capsys, "train")


def test_text_data_keeps_reading_crlf_as_newlines(tmp_path):
    from peftfast.cli.data import _read_text

    (tmp_path / "d.txt").write_bytes("a\r\nb\rc\u00e9\n".encode())
    assert _read_text(tmp_path / "d.txt") == "a\nb\nc\u00e9\n"


def test_target_modules_matching_nothing_is_one_line(tmp_path, capsys):
    rc = cli_main(["train", "--method", "lora", "--target-modules", "nope_proj", "--max-steps", "1",
                   "--output", str(tmp_path / "o"), *FAST])
    assert rc == 2
    assert "--target-modules nope_proj: target_modules=['nope_proj'] matched no module" in _one_error_line(capsys, "train")


def test_truncated_training_state_on_resume_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["train", "--method", "lora", "--max-steps", "2", "--output", str(out), *FAST]) == 0
    state = out / "checkpoint-2" / "training_state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    capsys.readouterr()
    assert cli_main(["train", "--output", str(out), "--resume"]) == 2
    assert "training_state.safetensors is truncated or damaged" in _one_error_line(capsys, "train")


def test_disk_full_at_a_periodic_checkpoint_is_one_line_and_keeps_the_last(tmp_path, monkeypatch, capsys):
    import errno

    import peftfast.cli.resume as resume

    real = resume.save_checkpoint

    def full(output, step, *a, **k):
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(output, step, *a, **k)

    monkeypatch.setattr(resume, "save_checkpoint", full)
    out = tmp_path / "run"
    rc = cli_main(["train", "--method", "lora", "--max-steps", "3", "--save-steps", "1", "--output", str(out), *FAST])
    assert rc == 2
    line = _one_error_line(capsys, "train")
    assert "No space left on device" in line and "checkpoint-1" in line and "intact" in line
    assert (out / "checkpoint-1" / "training_state.json").is_file()


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_damaged_adapter_weights_name_the_file(tmp_path, capsys, damage):
    path = tmp_path / "adapter"
    peftfast.save_adapter(_patched(), path)
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200] if damage == "truncated" else os.urandom(512))
    with pytest.raises(peftfast.AdapterLoadError, match=r"adapter_model\.safetensors is not a readable safetensors"):
        peftfast.load_adapter(tiny_llama(), path)
    assert cli_main(["inspect", str(path)]) == 2
    assert "adapter_model.safetensors is not a readable safetensors file" in _one_error_line(capsys, "inspect")


def test_a_pickle_bin_is_refused_with_the_reason(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pickle ran",))

    path = tmp_path / "adapter"
    peftfast.save_adapter(_patched(), path)
    (path / "adapter_model.safetensors").unlink()
    torch.save({"x": Evil()}, path / "adapter_model.bin")
    with pytest.raises(peftfast.AdapterLoadError, match="refused") as info:
        peftfast.load_adapter(tiny_llama(), path)
    assert "weights_only=False" not in str(info.value) and "can run code" in str(info.value)


def test_permission_error_names_the_path_asked_for(tmp_path, monkeypatch):
    import errno
    import tempfile

    def denied(prefix="", dir=None, **k):  # what mkdtemp raises in a folder one may not write (even as root here)
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, prefix + "abc"))

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    with pytest.raises(PermissionError) as info:
        peftfast.save_adapter(_patched(), tmp_path / "adapter")
    assert str(tmp_path / "adapter") in str(info.value) and ".peftfast-save" not in str(info.value)


def test_tuning_tables_use_the_one_atomic_writer_and_the_umask(tmp_path, monkeypatch):
    import peftfast.fileio as fileio
    from peftfast.kernels import tuning

    used = []
    real = fileio.replace_atomically
    monkeypatch.setattr(fileio, "replace_atomically", lambda *a, **k: used.append(a[0]) or real(*a, **k))
    old = os.umask(0o022)
    try:
        tuning._write_json_atomic(tmp_path / "cfg" / "gpu.json", {"a": 1})
    finally:
        os.umask(old)
    assert used == [tmp_path / "cfg" / "gpu.json"]
    assert json.loads((tmp_path / "cfg" / "gpu.json").read_text()) == {"a": 1}
    assert (tmp_path / "cfg" / "gpu.json").stat().st_mode & 0o777 == 0o644
