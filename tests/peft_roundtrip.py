"""One adapter, both ways against Hugging Face PEFT: the round trip the layer parity tests share.

PEFT makes the adapter with random non-zero weights (``init_lora_weights=False`` /
``init_ia3_weights=False``: no no-op adapter can pass), and then:

1. PEFT's file loads into peftfast with the same outputs;
2. peftfast's file holds the same keys and tensors and loads into PEFT with the same outputs;
3. the trainable parameter counts agree, for the loaded adapter and for a fresh ``patch``;
4. a few AdamW steps give the same losses and outputs;
5. merge / unmerge keep the trained outputs.

Everything runs in float32 with the same ops on both sides, so 1e-5 relative is ~100x float32
reordering and far below a wrong key, layout, scaling or trainable flag (those move outputs by 1e-2+).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

import peft
from safetensors.torch import load_file

import peftfast

from helpers import assert_rel_close, train_side_by_side

TOL = 1e-5
WEIGHTS = "adapter_model.safetensors"


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def configs(method: str, cfg: dict) -> tuple:
    """(peft config, peftfast config) for ``method`` "lora" or "ia3", with random non-zero init."""
    if method == "lora":
        cfg = dict(init_lora_weights=False, **cfg)
        return peft.LoraConfig(**cfg), peftfast.LoraConfig(**cfg)
    cfg = dict(init_ia3_weights=False, **cfg)
    return peft.IA3Config(**cfg), peftfast.IA3Config(**cfg)


def check_roundtrip(tmp_path, build: Callable[[], nn.Module], run: Callable[[nn.Module], torch.Tensor],
                    method: str, cfg: dict, *, steps: int = 3, merge: bool = True,
                    tol: float = TOL, peft_model: Optional[nn.Module] = None) -> tuple:
    """Steps 1-5 above; returns (peft model, peftfast model) after training.

    Args:
        build: a fresh base model, the same weights every call.
        run: the model's output on fixed inputs (the loss is its mean square).
        method: "lora" or "ia3".
        cfg: config fields shared by both libraries.
        merge: also check merge / unmerge (off where merging is refused).
    """
    peft_cfg, ours_cfg = configs(method, cfg)
    pm = peft_model if peft_model is not None else peft.get_peft_model(build(), peft_cfg)
    pm.save_pretrained(tmp_path / "peft")
    ours = peftfast.load_adapter(build(), tmp_path / "peft", is_trainable=True)
    with torch.no_grad():
        expected = run(pm)
        assert (expected - run(build())).abs().max() > 1e-2, "adapter is a no-op: vacuous test"
        assert_rel_close(run(ours), expected, tol, "outputs, PEFT adapter in peftfast")

    peftfast.save_adapter(ours, tmp_path / "ours")
    theirs_sd, ours_sd = load_file(tmp_path / "peft" / WEIGHTS), load_file(tmp_path / "ours" / WEIGHTS)
    assert sorted(ours_sd) == sorted(theirs_sd)
    for key in theirs_sd:
        assert ours_sd[key].shape == theirs_sd[key].shape and torch.equal(ours_sd[key], theirs_sd[key]), key
    back = peft.PeftModel.from_pretrained(build(), tmp_path / "ours")
    with torch.no_grad():
        assert_rel_close(run(back), expected, tol, "outputs, peftfast adapter in PEFT")

    assert trainable(ours) == trainable(pm), "trainable parameters, loaded adapter"
    fresh = peftfast.patch(build(), ours_cfg)
    assert trainable(fresh) == trainable(peft.get_peft_model(build(), configs(method, cfg)[0])), (
        "trainable parameters, patched base"
    )

    train_side_by_side(pm, ours, lambda m: run(m).square().mean(), tol, steps)
    with torch.no_grad():
        trained = run(ours)
        assert (trained - expected).abs().max() > 1e-4, "training moved nothing: vacuous test"
        assert_rel_close(trained, run(pm), tol, "outputs after training")
        if merge:
            peftfast.merge(ours)
            assert_rel_close(run(ours), trained, tol, "merged")
            peftfast.unmerge(ours)
            assert_rel_close(run(ours), trained, tol, "unmerged")
    return pm, ours
