"""Parity with Hugging Face PEFT, the correctness oracle.

Every test builds a tiny random model (tests/models.py), puts the same adapter into it through PEFT and
through peftfast (adapters made with ``init_lora_weights=False`` / ``init_ia3_weights=False`` so they are
not no-ops), and checks that both compute the same thing: logits (left-padded inputs with an attention
mask), saved files, training losses, gradients and weights, merge/unmerge, several adapters, 4-bit bases
and the trainable-parameter line. Everything runs on CPU in float32 on the reference backend, where the
two sides do the same float32 arithmetic in (nearly) the same order: 1e-5 relative is ~100x the float32
rounding they can differ by, and far below any real difference (a missing scaling, a wrong layer or a
missing adapter moves logits by 1e-2 or more).
"""
from __future__ import annotations

import copy
import io
import json
import os
from contextlib import redirect_stdout

import pytest
import torch

peft = pytest.importorskip("peft")
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import peftfast  # noqa: E402
from peftfast.layers import AdapterLayer, ModulesToSave  # noqa: E402

from bnb_oracle import dense_twin  # noqa: E402
from helpers import assert_rel_close, rel_err  # noqa: E402
from models import make_inputs, make_model, quantize_4bit, task_kind, without_labels  # noqa: E402

TOL = 1e-5
TASK = {"causal": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}
PEFT_PREFIX = "base_model.model."


# ----------------------------------------------------------------------------------------------- helpers
def make_cfg(family: str, method: str = "lora", **kw):
    """A fresh ``peft`` config (PEFT mutates configs it is given, so never share one between models)."""
    kw.setdefault("task_type", TASK[task_kind(family)])
    if method == "ia3":
        kw.setdefault("init_ia3_weights", False)
        return peft.IA3Config(**kw)
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    kw.setdefault("init_lora_weights", False)
    return peft.LoraConfig(**kw)


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**without_labels(inputs)).logits


def peft_wrapped(pm) -> set:
    return {n[len(PEFT_PREFIX):] for n, m in pm.named_modules() if isinstance(m, BaseTunerLayer)}


def fast_wrapped(model) -> set:
    return {n for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def peft_trainable(pm) -> dict:
    return {n[len(PEFT_PREFIX):]: p for n, p in pm.named_parameters() if p.requires_grad}


def fast_trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def peft_to_fast(base, cfg, tmp_path):
    """PEFT creates and saves an adapter; peftfast loads it into a copy of ``base`` (trainable)."""
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    pm.save_pretrained(str(tmp_path / "peft"))
    fast = copy.deepcopy(base)
    peftfast.load_adapter(fast, str(tmp_path / "peft"), is_trainable=True)
    return pm, fast


def fast_to_peft(base, cfg, tmp_path):
    """peftfast creates and saves an adapter; PEFT loads it (trainable) into a copy of ``base``."""
    fast = copy.deepcopy(base)
    peftfast.patch(fast, cfg)
    peftfast.save_adapter(fast, str(tmp_path / "fast"))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "fast"), is_trainable=True)
    return pm, fast


def make_pair(base, family, cfg, tmp_path):
    """PEFT and peftfast models with the same adapter weights (SEQ_CLS through peftfast -> PEFT, the
    rest through PEFT -> peftfast, so both directions are exercised by the training tests)."""
    if task_kind(family) == "seq_cls":
        return fast_to_peft(base, cfg, tmp_path)
    return peft_to_fast(base, cfg, tmp_path)


def assert_same_files(dir_fast, dir_peft, values: bool) -> None:
    a = load_file(os.path.join(dir_fast, "adapter_model.safetensors"))
    b = load_file(os.path.join(dir_peft, "adapter_model.safetensors"))
    assert sorted(a) == sorted(b), f"saved keys differ: only peftfast {sorted(set(a) - set(b))[:5]}, only peft {sorted(set(b) - set(a))[:5]}"
    for k in b:
        assert a[k].shape == b[k].shape, f"{k}: {tuple(a[k].shape)} vs peft {tuple(b[k].shape)}"
        assert a[k].dtype == b[k].dtype, f"{k}: {a[k].dtype} vs peft {b[k].dtype}"
        if values:
            assert torch.equal(a[k], b[k]), f"{k}: values changed through a load/save round trip"
    ca = json.load(open(os.path.join(dir_fast, "adapter_config.json")))
    cb = json.load(open(os.path.join(dir_peft, "adapter_config.json")))
    fields = ["peft_type", "task_type", "r", "lora_alpha", "use_dora", "use_rslora", "lora_dropout", "bias",
              "rank_pattern", "alpha_pattern", "layers_to_transform", "init_ia3_weights"]
    for f in fields:
        assert ca.get(f) == cb.get(f), f"adapter_config {f}: peftfast {ca.get(f)!r} vs peft {cb.get(f)!r}"
    for f in ("feedforward_modules",):
        norm = lambda v: sorted(v) if isinstance(v, list) else v  # noqa: E731
        assert norm(ca.get(f)) == norm(cb.get(f)), f"adapter_config {f}: {ca.get(f)!r} vs peft {cb.get(f)!r}"
    # modules_to_save: PEFT writes the SEQ_CLS heads it adds; peftfast may leave them implied by task_type.
    heads = {"classifier", "score"} if cb.get("task_type") == "SEQ_CLS" else set()
    assert set(ca.get("modules_to_save") or []) | heads == set(cb.get("modules_to_save") or []) | heads


# ---------------------------------------------------------------------------------- 1. forward parity
FAMILY_LISTS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "o_proj", "up_proj"],
    "gpt2": ["c_attn", "c_proj"],  # Conv1D layers
    "opt": ["q_proj", "v_proj", "fc1"],
    "bert_cls": ["query", "value"],
    "llama_cls": ["q_proj", "v_proj"],
    "t5": ["q", "v", "wo"],
}

VARIANT_CASES = {
    "rslora": ("llama", "lora", dict(target_modules="all-linear", use_rslora=True, r=4, lora_alpha=6)),
    "dora": ("llama", "lora", dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)),
    "dora-conv1d": ("gpt2", "lora", dict(target_modules=["c_attn", "c_proj"], use_dora=True)),
    "dora-bias": ("opt", "lora", dict(target_modules=["q_proj", "fc2"], use_dora=True)),
    "dropout-eval": ("llama", "lora", dict(target_modules="all-linear", lora_dropout=0.3)),
    "rank-alpha-pattern": ("llama", "lora", dict(
        target_modules="all-linear", rank_pattern={"layers.0.self_attn.q_proj": 2, "down_proj": 6},
        alpha_pattern={"v_proj": 3, "layers.1.mlp.up_proj": 16})),
    "layers-to-transform": ("llama", "lora", dict(target_modules=["q_proj", "v_proj", "gate_proj"], layers_to_transform=[1])),
    "layers-pattern": ("gpt2", "lora", dict(target_modules=["c_attn", "c_fc"], layers_to_transform=[0], layers_pattern="h")),
    "exclude-list": ("llama", "lora", dict(target_modules="all-linear", exclude_modules=["o_proj", "layers.0.mlp.up_proj"])),
    "exclude-regex": ("qwen2", "lora", dict(target_modules="all-linear", exclude_modules=r".*layers\.1\..*")),
    "target-regex": ("llama", "lora", dict(target_modules=r".*\.(q|k)_proj")),
    "bias-all": ("opt", "lora", dict(target_modules=["q_proj", "v_proj"], bias="all")),
    "bias-lora-only": ("gpt2", "lora", dict(target_modules=["c_attn"], bias="lora_only")),
    "modules-to-save": ("llama", "lora", dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])),
    "ia3-llama": ("llama", "ia3", dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "ia3-gpt2": ("gpt2", "ia3", dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])),
    "ia3-t5": ("t5", "ia3", dict(target_modules=["k", "v", "wo"], feedforward_modules=["wo"])),
    "ia3-bert-cls": ("bert_cls", "ia3", dict(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])),
}


def _peft_to_fast_case(family, method, kw, tmp_path):
    base = make_model(family)
    inputs = make_inputs(family)
    ref = logits(base, inputs)
    pm, fast = peft_to_fast(base, make_cfg(family, method, **kw), tmp_path)
    pm.eval(), fast.eval()
    assert fast_wrapped(fast) == peft_wrapped(pm)
    out_peft, out_fast = logits(pm, inputs), logits(fast, inputs)
    assert rel_err(out_peft, ref) > 1e-3, "the adapter does not change the output: the test would prove nothing"
    assert_rel_close(out_fast, out_peft, TOL, f"{family} PEFT->peftfast logits")
    assert sorted(fast_trainable(fast)) == sorted(peft_trainable(pm)), "different parameters train"
    # peftfast saves what it loaded: same keys, shapes, dtypes, values and config fields as PEFT's file
    peftfast.save_adapter(fast, str(tmp_path / "resaved"))
    assert_same_files(str(tmp_path / "resaved"), str(tmp_path / "peft"), values=True)


def _fast_to_peft_case(family, method, kw, tmp_path):
    base = make_model(family)
    inputs = make_inputs(family)
    ref = logits(base, inputs)
    fast = copy.deepcopy(base)
    peftfast.patch(fast, make_cfg(family, method, **kw))  # peftfast's own init_*_weights=False init
    fast.eval()
    peftfast.save_adapter(fast, str(tmp_path / "fast"))
    peft.get_peft_model(copy.deepcopy(base), make_cfg(family, method, **kw)).save_pretrained(str(tmp_path / "peft"))
    assert_same_files(str(tmp_path / "fast"), str(tmp_path / "peft"), values=False)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "fast"))
    assert peft_wrapped(pm) == fast_wrapped(fast)
    out_fast = logits(fast, inputs)
    assert rel_err(out_fast, ref) > 1e-3, "peftfast's init_*_weights=False adapter is a no-op"
    assert_rel_close(logits(pm, inputs), out_fast, TOL, f"{family} peftfast->PEFT logits")


DIRECTIONS = {"peft2fast": _peft_to_fast_case, "fast2peft": _fast_to_peft_case}


def _params(cases: dict):
    out = []
    for case, (family, method, kw) in cases.items():
        for direction in DIRECTIONS:
            out.append(pytest.param(family, method, kw, direction, id=f"{case}-{direction}"))
    return out


FORWARD_CASES = {f"{f}-all-linear": (f, "lora", dict(target_modules="all-linear")) for f in FAMILY_LISTS}
FORWARD_CASES.update({f"{f}-list": (f, "lora", dict(target_modules=t)) for f, t in FAMILY_LISTS.items()})


@pytest.mark.parametrize("family,method,kw,direction", _params(FORWARD_CASES))
def test_forward_parity(family, method, kw, direction, tmp_path):
    DIRECTIONS[direction](family, method, kw, tmp_path)


@pytest.mark.parametrize("family,method,kw,direction", _params(VARIANT_CASES))
def test_variant_parity(family, method, kw, direction, tmp_path):
    DIRECTIONS[direction](family, method, kw, tmp_path)


# ------------------------------------------------------------------------------------------- 3. training
TRAIN_CASES = {
    "llama-all-linear": ("llama", "lora", dict(target_modules="all-linear")),
    "llama-dora": ("llama", "lora", dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)),
    "llama-ia3": ("llama", "ia3", dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "gpt2-bias-lora-only": ("gpt2", "lora", dict(target_modules=["c_attn", "c_proj"], bias="lora_only")),
    "opt-bias-all": ("opt", "lora", dict(target_modules=["q_proj", "v_proj", "fc1"], bias="all")),
    "bert-seq-cls": ("bert_cls", "lora", dict(target_modules=["query", "value"])),
    "llama-seq-cls": ("llama_cls", "lora", dict(target_modules="all-linear", use_rslora=True)),
    "t5-seq2seq": ("t5", "lora", dict(target_modules=["q", "v", "wo"])),
}
STEPS = 4


def _train(model, batches):
    """AdamW(lr=1e-2) on the trainable parameters; returns (losses, grads after the first backward)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses, first = [], None
    for i, batch in enumerate(batches):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        if i == 0:
            first = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses, first


def _assert_training_parity(pm, fast, batches):
    peft_losses, peft_grads = _train(pm, batches)
    fast_losses, fast_grads = _train(fast, batches)
    peft_grads = {k[len(PEFT_PREFIX):]: v for k, v in peft_grads.items()}
    assert sorted(fast_grads) == sorted(peft_grads)
    # Some gradients are zero in exact arithmetic (a key projection's bias: softmax ignores a constant
    # shift) and only float noise (~1e-10) in practice: measure errors against the whole gradient's size.
    floor = 1e-3 * torch.cat([g.flatten() for g in peft_grads.values()]).norm().item()
    assert floor > 0, "all gradients are zero: the test would prove nothing"
    for k, g in peft_grads.items():
        err = (fast_grads[k].double() - g.double()).norm().item()
        assert err <= TOL * max(g.norm().item(), floor), f"grad {k}: error {err:.3e}, norm {g.norm().item():.3e}"
    for step, (a, b) in enumerate(zip(fast_losses, peft_losses)):
        assert abs(a - b) <= TOL * abs(b), f"step {step}: loss {a!r} (peftfast) vs {b!r} (PEFT)"
    assert fast_losses[-1] != fast_losses[0], "the loss did not move: nothing was trained"
    want = get_peft_model_state_dict(pm)
    got = peftfast.adapter_state_dict(fast)
    assert sorted(got) == sorted(want)
    # AdamW turns a noise-level gradient (< floor; see above) into a full-size random step, so such
    # parameters (whose value cannot affect the loss) are compared by key only.
    noise = {PEFT_PREFIX + k.replace(".base_layer.", ".") for k, g in peft_grads.items() if g.norm().item() < floor}
    for k, v in want.items():
        if k not in noise:
            assert_rel_close(got[k], v, TOL, f"trained {k}")


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_training_parity(case, tmp_path):
    family, method, kw = TRAIN_CASES[case]
    base = make_model(family)
    pm, fast = make_pair(base, family, make_cfg(family, method, **kw), tmp_path)
    batches = [make_inputs(family, seed=10 + i) for i in range(STEPS)]
    _assert_training_parity(pm, fast, batches)


# ------------------------------------------------------------- 4. merge, disable, several adapters, unpatch
MERGE_CASES = {
    "llama-lora": ("llama", "lora", dict(target_modules="all-linear")),
    "llama-dora": ("llama", "lora", dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)),
    "gpt2-conv1d": ("gpt2", "lora", dict(target_modules=["c_attn", "c_proj", "c_fc"])),
    "opt-ia3": ("opt", "ia3", dict(target_modules=["q_proj", "k_proj", "fc2"], feedforward_modules=["fc2"])),
    "bert-seq-cls": ("bert_cls", "lora", dict(target_modules="all-linear")),
}


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_unmerge_disable(case, tmp_path):
    family, method, kw = MERGE_CASES[case]
    base = make_model(family)
    inputs = make_inputs(family)
    pm, fast = make_pair(base, family, make_cfg(family, method, **kw), tmp_path)
    pm.eval(), fast.eval()
    before = logits(fast, inputs)
    assert_rel_close(before, logits(pm, inputs), TOL, "unmerged")

    with peftfast.disable_adapters(fast):
        assert torch.equal(logits(fast, inputs), logits(base, inputs)), "disabled adapters must give the base model exactly"
    assert torch.equal(logits(fast, inputs), before), "leaving disable_adapters must restore the adapter"

    peftfast.merge(fast)
    merged = logits(fast, inputs)
    assert_rel_close(merged, before, TOL, "merged vs unmerged")
    merged_peft = pm.merge_and_unload()
    assert_rel_close(merged, logits(merged_peft, inputs), TOL, "merged vs PEFT merge_and_unload")
    peftfast.unmerge(fast)
    assert_rel_close(logits(fast, inputs), before, TOL, "after unmerge")
    for name in fast_wrapped(fast):  # the base weights come back (up to float rounding)
        w0 = base.get_submodule(name).weight
        assert_rel_close(fast.get_submodule(name).base_layer.weight, w0, TOL, f"{name} weight after unmerge")


def _make_two_adapters(tmp_path, family="llama"):
    base = make_model(family)
    dirs = {}
    cfgs = {"a": dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8),
            "b": dict(target_modules="all-linear", r=2, lora_alpha=5, use_rslora=True)}
    for name, kw in cfgs.items():
        torch.manual_seed(100 + ord(name))
        pm = peft.get_peft_model(copy.deepcopy(base), make_cfg(family, **kw))
        dirs[name] = str(tmp_path / name)
        pm.save_pretrained(dirs[name])
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs["a"], adapter_name="a", is_trainable=True)
    pm.load_adapter(dirs["b"], adapter_name="b", is_trainable=True)
    fast = copy.deepcopy(base)
    peftfast.load_adapter(fast, dirs["a"], adapter_name="a", is_trainable=True)
    peftfast.load_adapter(fast, dirs["b"], adapter_name="b", is_trainable=True)
    return base, pm, fast


def test_several_adapters(tmp_path):
    base, pm, fast = _make_two_adapters(tmp_path)
    inputs = make_inputs("llama")
    seen = []
    for active in ("a", "b", ["a", "b"], "a"):
        if isinstance(active, str):
            pm.set_adapter(active)
        else:
            pm.base_model.set_adapter(active)  # PeftModel.set_adapter takes one name; the tuner takes a list
        peftfast.set_adapter(fast, active)
        out = logits(fast, inputs)
        assert_rel_close(out, logits(pm, inputs), TOL, f"active={active}")
        assert sorted(fast_trainable(fast)) == sorted(peft_trainable(pm)), f"active={active}: trainable sets differ"
        seen.append(out)
    assert rel_err(seen[0], seen[1]) > 1e-3 and rel_err(seen[2], seen[1]) > 1e-3, "adapters are indistinguishable"
    assert torch.equal(seen[0], seen[3]), "switching back must give the first adapter's output exactly"
    # training the pair: same losses and updates on both sides
    _assert_training_parity_multi(pm, fast)


def _assert_training_parity_multi(pm, fast):
    pm.base_model.set_adapter(["a", "b"])
    peftfast.set_adapter(fast, ["a", "b"])
    batches = [make_inputs("llama", seed=30 + i) for i in range(3)]
    peft_losses, _ = _train(pm, batches)
    fast_losses, _ = _train(fast, batches)
    for a, b in zip(fast_losses, peft_losses):
        assert abs(a - b) <= TOL * abs(b), f"losses {fast_losses} vs PEFT {peft_losses}"
    for name in ("a", "b"):
        want = get_peft_model_state_dict(pm, adapter_name=name)
        got = peftfast.adapter_state_dict(fast, name)
        assert sorted(got) == sorted(want)
        for k, v in want.items():
            assert_rel_close(got[k], v, TOL, f"adapter {name} {k}")


UNPATCH_CASES = ["llama", "bert_cls", "llama-4bit"]


@pytest.mark.parametrize("case", UNPATCH_CASES)
def test_unpatch_restores_model(case):
    family = "llama" if case == "llama-4bit" else case
    model = make_model(family)
    if case == "llama-4bit":
        quantize_4bit(model, "nf4", nested=True)
        # bitsandbytes' own eval forward of the unpatched base would repack it (and crash on these tiny
        # layers); what is checked here is that unpatch gives back the base as peftfast found it
        peftfast.layers.base_weight.keep_4bit_layout(model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    types = [(n, type(m)) for n, m in model.named_modules()]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    inputs = make_inputs(family)
    ref = logits(model, inputs)
    peftfast.patch(model, make_cfg(family, target_modules="all-linear"))
    peftfast.patch(model, make_cfg(family, target_modules=["v_proj"] if family == "llama" else ["value"]), adapter_name="two")
    _train(model, [inputs])  # moves adapters (and heads), never the base
    peftfast.unpatch(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    after = model.state_dict()
    assert sorted(after) == sorted(sd)
    for k, v in sd.items():
        assert torch.equal(after[k], v), f"{k} changed"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert "peftfast_state" not in model.__dict__
    assert torch.equal(logits(model, inputs), ref)


# ----------------------------------------------------------------------------------------- 5. 4-bit bases
QUANT_CASES = {"nf4-nested": ("nf4", True), "fp4-plain": ("fp4", False)}


@pytest.mark.parametrize("case", list(QUANT_CASES))
def test_4bit_parity(case, tmp_path):
    """peftfast on the 4-bit base against PEFT on its fp32 twin (the same codes decoded exactly,
    independently of peftfast: tests/bnb_oracle.py), both in float32: the quantization error is common to
    both and cancels, so they must agree to float32 rounding (1e-5), not to the NF4/FP4 quantization error
    (~1e-1 relative on weights), which we check is really present. PEFT on bitsandbytes itself is no oracle
    on CPU (bf16 compute after an in-place repack, a CPU dequantize that is wrong where blocks straddle
    rows); on a GPU tests/kernels/test_nf4.py holds peftfast's decode bit-exact to bitsandbytes' CUDA one."""
    quant_type, nested = QUANT_CASES[case]
    dense = make_model("llama")
    base = quantize_4bit(copy.deepcopy(dense), quant_type, nested=nested)
    twin = dense_twin(base)
    w = next(m.weight for m in base.modules() if m.__class__.__name__ == "Linear4bit")
    assert w.quant_state.quant_type == quant_type and bool(w.quant_state.nested) == nested
    inputs = make_inputs("llama")
    ref = logits(twin, inputs)
    assert rel_err(ref, logits(dense, inputs)) > 1e-3, "the model is not really quantized"

    cfg = lambda: make_cfg("llama", target_modules="all-linear")  # noqa: E731
    pm = peft.get_peft_model(copy.deepcopy(twin), cfg())
    pm.save_pretrained(str(tmp_path / "peft"))
    fast = copy.deepcopy(base)
    peftfast.load_adapter(fast, str(tmp_path / "peft"), is_trainable=True)
    assert fast_wrapped(fast) == peft_wrapped(pm)
    assert_rel_close(logits(fast, inputs), logits(pm, inputs), TOL, f"{case} PEFT->peftfast logits")

    batches = [make_inputs("llama", seed=20 + i) for i in range(3)]
    _assert_training_parity(pm, fast, batches)

    # round trip through PEFT's loader, from peftfast's trained adapter
    peftfast.save_adapter(fast, str(tmp_path / "fast"))
    assert_same_files(str(tmp_path / "fast"), str(tmp_path / "peft"), values=False)
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(twin), str(tmp_path / "fast"))
    assert_rel_close(logits(pm2, inputs), logits(fast, inputs), TOL, f"{case} peftfast->PEFT logits")


# ------------------------------------------------------------------------------- 6. print_trainable_parameters
PRINT_CASES = {
    "llama-lora": ("llama", "lora", dict(target_modules="all-linear"), False),
    "bert-seq-cls": ("bert_cls", "lora", dict(target_modules=["query", "value"]), False),
    "gpt2-ia3": ("gpt2", "ia3", dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]), False),
    "llama-4bit-dora": ("llama", "lora", dict(target_modules=["q_proj", "down_proj"], use_dora=True), True),
}


@pytest.mark.parametrize("case", list(PRINT_CASES))
def test_print_trainable_parameters(case):
    family, method, kw, four_bit = PRINT_CASES[case]
    base = make_model(family)
    if four_bit:
        quantize_4bit(base, "nf4", nested=True)
    pm = peft.get_peft_model(copy.deepcopy(base), make_cfg(family, method, **kw))
    fast = copy.deepcopy(base)
    peftfast.patch(fast, make_cfg(family, method, **kw))
    out_peft, out_fast = io.StringIO(), io.StringIO()
    with redirect_stdout(out_peft):
        pm.print_trainable_parameters()
    with redirect_stdout(out_fast):
        peftfast.print_trainable_parameters(fast)
    assert out_peft.getvalue().startswith("trainable params: ")
    assert out_fast.getvalue() == out_peft.getvalue()
    assert peftfast.trainable_parameters(fast) == pm.get_nb_trainable_parameters()


def test_inference_load_follows_eval_mode(tmp_path):
    """An adapter loaded for inference into an eval-mode model applies no dropout (PEFT's from_pretrained
    puts the model in eval mode; peftfast's wrappers follow their base layer's mode)."""
    base = make_model("llama")  # eval mode, as from_pretrained returns models
    pm = peft.get_peft_model(copy.deepcopy(base), make_cfg("llama", target_modules="all-linear", lora_dropout=0.5))
    pm.save_pretrained(str(tmp_path / "peft"))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"))
    fast = copy.deepcopy(base)
    peftfast.load_adapter(fast, str(tmp_path / "peft"))
    inputs = make_inputs("llama")
    first = logits(fast, inputs)
    assert torch.equal(first, logits(fast, inputs)), "inference after load_adapter is random: dropout is on"
    assert_rel_close(first, logits(loaded, inputs), TOL, "inference logits")
