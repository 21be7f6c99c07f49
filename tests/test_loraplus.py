"""LoRA+ (peftfast.create_loraplus_optimizer) against peft.optimizers.create_loraplus_optimizer.

The same tiny OPT (LayerNorms with biases, linear layers with biases, token embeddings) is patched by PEFT
and by peftfast with one config that puts a parameter in every LoRA+ group: LoRA on attention and MLP
linears and on the token embedding, trainable linear biases (``bias="lora_only"``), a LayerNorm in
``modules_to_save``. Both optimizers must hold the same parameters, by name, in the same groups with the
same lr and weight decay, and a few AdamW steps must leave the same adapter weights.
"""
import copy
import math

import pytest
import torch

import peftfast
from helpers import rel_err
from models import make_inputs, make_model

CONFIG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1", "embed_tokens"], bias="lora_only",
              modules_to_save=["final_layer_norm"], init_lora_weights=False)
LR, RATIO, LR_EMB, DECAY = 1e-3, 16.0, 3e-4, 0.05


def _pair():
    from peft import LoraConfig, get_peft_model

    base = make_model("opt", seed=3)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(**CONFIG))
    ours = peftfast.patch(copy.deepcopy(base), peftfast.LoraConfig(**CONFIG))
    # Same adapter start: copy PEFT's (random, init_lora_weights=False) adapter into peftfast's.
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                mine[_ours(name)].copy_(p)
    return theirs, ours


def _ours(peft_name: str) -> str:
    """PEFT's parameter name (under PeftModel.base_model.model) as peftfast's (on the model itself)."""
    return peft_name.removeprefix("base_model.model.")


def _groups(opt, model, rename=lambda n: n):
    names = {id(p): rename(n) for n, p in model.named_parameters()}
    return [(sorted(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"]) for g in opt.param_groups]


def test_groups_lrs_and_steps_match_peft():
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus

    theirs, ours = _pair()
    opt_t = peft_loraplus(theirs, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO, loraplus_lr_embedding=LR_EMB,
                          loraplus_weight_decay=DECAY)
    opt_o = peftfast.create_loraplus_optimizer(ours, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                               loraplus_lr_embedding=LR_EMB, weight_decay=DECAY)
    groups_t, groups_o = _groups(opt_t, theirs, _ours), _groups(opt_o, ours)
    assert groups_o == groups_t
    # Every group is populated, so the comparison covers each rule (A, embedding, B, B without decay).
    a, emb, b, b_nd = groups_o
    assert all(names for names, _, _ in groups_o), groups_o
    assert all(".lora_A." in n for n in a[0]) and (a[1], a[2]) == (LR, DECAY)
    assert {n.rsplit(".", 2)[-2] for n in emb[0]} == {"lora_embedding_A", "lora_embedding_B"} and emb[1] == LR_EMB
    assert all(".lora_B." in n for n in b[0]) and (b[1], b[2]) == (LR * RATIO, DECAY)
    assert {n.rsplit(".", 1)[-1] for n in b_nd[0]} == {"weight", "bias"} and (b_nd[1], b_nd[2]) == (LR * RATIO, 0.0)
    assert any("final_layer_norm" in n for n in b_nd[0]) and any(n.endswith("base_layer.bias") for n in b_nd[0])

    batch = make_inputs("opt", batch=3, seq=9, seed=5)
    for model, opt in ((theirs, opt_t), (ours, opt_o)):
        model.train()
        for _ in range(4):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
    trained_t = {_ours(n): p.detach() for n, p in theirs.named_parameters() if p.requires_grad}
    trained_o = {n: p.detach() for n, p in ours.named_parameters() if p.requires_grad}
    assert trained_o.keys() == trained_t.keys()
    start = dict(_pair()[1].named_parameters())
    for name, t in trained_t.items():
        # fp32 forward/backward in another order of operations: a few ulps per step, amplified by Adam's
        # normalisation on tiny gradients; 1e-4 is far below the update itself (checked next).
        err = rel_err(trained_o[name], t)
        assert err < 1e-4, f"{name}: rel err {err:.2e}"
        assert rel_err(t, start[name].detach()) > 100 * max(err, 1e-7), f"{name} did not train"


def test_weight_decay_is_applied_not_dropped():
    """PEFT overrides a plain ``weight_decay=`` with each group's own; here it is the groups' decay."""
    _, ours = _pair()
    opt = peftfast.create_loraplus_optimizer(ours, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=2, weight_decay=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.1, 0.1, 0.0]
    with pytest.raises(ValueError, match="name the same setting"):
        peftfast.create_loraplus_optimizer(ours, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=2, weight_decay=0.1,
                                           loraplus_weight_decay=0.2)


@pytest.mark.parametrize("ratio", [0, -2.0, math.nan, math.inf, "x"])
def test_bad_ratio_is_refused(ratio):
    _, ours = _pair()
    with pytest.raises(ValueError, match="loraplus_lr_ratio must be"):
        peftfast.create_loraplus_optimizer(ours, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=ratio)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        peftfast.create_loraplus_optimizer(ours, torch.optim.AdamW, lr=math.nan, loraplus_lr_ratio=2)


def test_unpatched_model_is_refused():
    model = make_model("opt")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        peftfast.create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=2)
