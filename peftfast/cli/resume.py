"""Resumable training checkpoints for ``peftfast train``, without pickle.

A checkpoint is a directory ``<output>/checkpoint-<step>`` holding:

* the adapter in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``: the directory
  is itself a loadable adapter);
* ``training_state.safetensors``: every tensor of the optimizer state (``optimizer.<param index>.<key>``)
  and the RNG states (``rng.cpu``, ``rng.cuda.<device>``);
* ``training_state.json``: the step, the losses so far, how many batches were consumed, the optimizer's
  param groups and non-tensor state, the LR scheduler's state and the run's arguments.

It is written beside its final name and swapped into place (:func:`peftfast.fileio.staged_directory`), so
a checkpoint exists complete or not at all; older ``checkpoint-*`` directories are removed once the new one is in place.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from ..fileio import staged_directory

STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
VERSION = 1


def rng_state() -> dict:
    """The torch RNG states (CPU and every CUDA device) as uint8 tensors."""
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def set_rng_state(tensors: dict) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in tensors.items() if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([v for _, v in cuda])


def flatten_optimizer(opt: torch.optim.Optimizer) -> tuple:
    """(tensors, structure): the optimizer's state dict split into safetensors-able tensors and JSON."""
    sd = opt.state_dict()
    tensors, state = {}, {}
    for pid, st in sd["state"].items():
        plain = {}
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{pid}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                plain[key] = value
        state[str(pid)] = {"tensors": sorted(k for k, v in st.items() if torch.is_tensor(v)), "values": plain}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"state": state, "param_groups": groups}


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict, structure: dict) -> None:
    state = {}
    for pid, entry in structure["state"].items():
        st = dict(entry["values"])
        for key in entry["tensors"]:
            st[key] = tensors[f"optimizer.{pid}.{key}"]
        state[int(pid)] = st
    groups = []
    for g in structure["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


def checkpoints(output) -> list:
    """``checkpoint-<step>`` directories of ``output`` that hold a complete state, oldest first."""
    output = Path(output)
    if not output.is_dir():
        return []
    found = []
    for d in output.iterdir():
        m = CHECKPOINT_RE.match(d.name)
        if m and d.is_dir() and (d / STATE_JSON).is_file() and (d / STATE_TENSORS).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def save_checkpoint(output, step: int, model, opt, sched, rng: dict, meta: dict, keep: int = 1) -> Path:
    """Write ``output/checkpoint-<step>`` atomically; of the others, keep the ``keep - 1`` newest."""
    import peftfast
    from safetensors.torch import save_file

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    final = output / f"checkpoint-{step}"
    # The same step may be saved twice (an interrupt right after a periodic save): the staged swap
    # replaces it whole, and the older checkpoints are removed only once the new one is in place.
    with staged_directory(final) as tmp:
        peftfast.save_adapter(model, str(tmp))
        tensors, opt_structure = flatten_optimizer(opt)
        tensors.update({k: v.contiguous() for k, v in rng.items()})
        save_file(tensors, str(tmp / STATE_TENSORS), metadata={"format": "pt"})
        sched_state = sched.state_dict()
        data = dict(meta, version=VERSION, step=step, optimizer=opt_structure, scheduler=sched_state)
        with open(tmp / STATE_JSON, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
    others = [c for c in checkpoints(output) if c != final]
    for stale in others[: max(0, len(others) - (keep - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def find_checkpoint(path) -> Optional[Path]:
    """``path`` itself when it is a checkpoint, else its newest ``checkpoint-*`` (None if there is none)."""
    path = Path(path)
    if (path / STATE_JSON).is_file():
        return path
    found = checkpoints(path)
    return found[-1] if found else None


def read_checkpoint(path) -> tuple:
    """(tensors, meta) of a checkpoint directory."""
    from safetensors.torch import load_file

    path = Path(path)
    with open(path / STATE_JSON, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint format version {meta.get('version')} is not {VERSION}")
    try:
        return load_file(str(path / STATE_TENSORS)), meta
    except Exception as e:  # safetensors' error for a truncated file names neither the file nor the cause
        raise ValueError(f"{path / STATE_TENSORS} is truncated or damaged ({e})") from None
