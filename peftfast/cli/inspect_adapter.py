"""``peftfast inspect ADAPTER_DIR``: what an adapter directory holds, without loading a model.

Prints the method, rank/alpha (LoRA, DoRA, rsLoRA) or virtual tokens (prefix/prompt tuning), targets,
parameter count, dtypes, size on disk and base model, plus the training summary when ``peftfast train``
wrote a ``train_log.json`` beside it; ``--json`` prints the same as one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from ..checkpoint import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
from ..config import CONFIG_NAME


class InspectError(ValueError):
    """Not an adapter directory."""


def _summarize_targets(targets) -> str:
    """Target modules by name: full paths (as PEFT saves an "all-linear" expansion: one per layer) are
    grouped by their last component with a count, so a 32-layer model reads as 7 names, not 224 paths."""
    if not isinstance(targets, list):
        return str(targets)  # a regex
    counts: dict = {}
    for t in targets:
        leaf = t.rsplit(".", 1)[-1]
        counts[leaf] = counts.get(leaf, 0) + 1
    if all(n == 1 for n in counts.values()):
        return ", ".join(sorted(targets))
    return ", ".join(f"{leaf} (x{n})" if n > 1 else leaf for leaf, n in sorted(counts.items()))

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter directory (PEFT format)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def describe(path) -> dict:
    """The facts about an adapter directory as a dict (what ``--json`` prints)."""
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not path.is_dir():
        raise InspectError(f"{path}: no such directory")
    if not cfg_file.is_file():
        raise InspectError(f"{path}: no {CONFIG_NAME}; not an adapter directory")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise InspectError(f"{cfg_file}: not valid JSON ({e})") from None
    peft_type = str(cfg.get("peft_type", "?")).upper()
    info = {"path": str(path.resolve()), "method": peft_type, "task_type": cfg.get("task_type"),
            "base_model": cfg.get("base_model_name_or_path")}
    if peft_type == "LORA":
        info["method"] = "DORA" if cfg.get("use_dora") else "LORA"
        info.update(r=cfg.get("r"), lora_alpha=cfg.get("lora_alpha"), use_rslora=bool(cfg.get("use_rslora")),
                    lora_dropout=cfg.get("lora_dropout"), rank_pattern=cfg.get("rank_pattern") or {},
                    alpha_pattern=cfg.get("alpha_pattern") or {})
    elif peft_type == "IA3":
        info["feedforward_modules"] = cfg.get("feedforward_modules")
    elif peft_type in ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING"):
        info.update(num_virtual_tokens=cfg.get("num_virtual_tokens"), token_dim=cfg.get("token_dim"),
                    num_layers=cfg.get("num_layers"))
    targets = cfg.get("target_modules")
    info["target_modules"] = sorted(targets) if isinstance(targets, list) else targets
    info["modules_to_save"] = cfg.get("modules_to_save")

    weights = path / WEIGHTS_NAME
    n_params, dtypes, n_tensors = 0, set(), 0
    if weights.is_file():
        from safetensors import safe_open

        try:
            opened = safe_open(str(weights), framework="pt")
        except Exception as e:  # safetensors' own error names neither the file nor what to do
            raise InspectError(f"{weights} is not a readable safetensors file ({e}); it is truncated or "
                               "damaged") from None
        with opened as f:
            for key in f.keys():
                t = f.get_slice(key)
                shape = t.get_shape()
                numel = 1
                for d in shape:
                    numel *= d
                n_params += numel
                n_tensors += 1
                dtypes.add(t.get_dtype())
        info["weights"] = WEIGHTS_NAME
    elif (path / LEGACY_WEIGHTS_NAME).is_file():
        info["weights"] = LEGACY_WEIGHTS_NAME + " (legacy; not read: use peftfast.load_adapter)"
    else:
        raise InspectError(f"{path}: no {WEIGHTS_NAME}; the adapter's weights are missing")
    info.update(parameters=n_params, tensors=n_tensors, dtypes=sorted(dtypes))
    info["size_on_disk"] = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    info["weights_size"] = (path / WEIGHTS_NAME).stat().st_size if weights.is_file() else None
    log_file = path / "train_log.json"
    if log_file.is_file():
        try:
            log = json.loads(log_file.read_text(encoding="utf-8"))
            losses = log.get("losses") or []
            info["training"] = {"method": log.get("method"), "steps": log.get("steps"),
                                "final_loss": losses[-1] if losses else None, "eval_loss": log.get("eval_loss"),
                                "base": log.get("base_model")}
        except ValueError:
            pass
    return info


def format_text(info: dict) -> str:
    lines = [f"adapter:      {info['path']}", f"method:       {info['method']}"
             + (f" (task {info['task_type']})" if info.get("task_type") else "")]
    if "r" in info:
        lines.append(f"rank/alpha:   r={info['r']}, lora_alpha={info['lora_alpha']}"
                     + (", rsLoRA" if info["use_rslora"] else "")
                     + (f", rank_pattern={info['rank_pattern']}" if info["rank_pattern"] else ""))
    if "num_virtual_tokens" in info:
        lines.append(f"virtual tokens: {info['num_virtual_tokens']} (token_dim {info['token_dim']}, "
                     f"{info['num_layers']} layers)")
    targets = info.get("target_modules")
    if targets:
        lines.append(f"targets:      {_summarize_targets(targets)}")
    if info.get("feedforward_modules"):
        lines.append(f"feedforward:  {info['feedforward_modules']}")
    if info.get("modules_to_save"):
        lines.append(f"modules_to_save: {info['modules_to_save']}")
    lines.append(f"parameters:   {info['parameters']:,d} in {info['tensors']} tensors ({', '.join(info['dtypes'])})")
    lines.append(f"size on disk: {_human(info['size_on_disk'])}"
                 + (f" (weights {_human(info['weights_size'])})" if info.get("weights_size") else ""))
    lines.append(f"base model:   {info.get('base_model') or '(not recorded)'}")
    t = info.get("training")
    if t:
        final = f"{t['final_loss']:.4f}" if isinstance(t.get("final_loss"), (int, float)) else "?"
        ev = f"{t['eval_loss']:.4f}" if isinstance(t.get("eval_loss"), (int, float)) else "?"
        lines.append(f"training:     peftfast train --method {t['method']}, {t['steps']} steps, final loss {final}, "
                     f"eval loss {ev}")
    return "\n".join(lines)


def run_inspect(args) -> dict:
    info = describe(args.adapter)
    print(json.dumps(info, indent=1) if args.json else format_text(info))
    return info


def main(argv: Optional[list] = None) -> dict:
    p = argparse.ArgumentParser(prog="peftfast inspect")
    add_arguments(p)
    return run_inspect(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
