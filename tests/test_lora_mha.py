"""LoRA on nn.MultiheadAttention (issue 17, item 3): against the math, and against Hugging Face PEFT.

The oracle for outputs and training is attention written out by hand (q/k/v from ``W_in + s B A``,
softmax, ``W_out + s B A``), with its own leaf copies of the adapter tensors; every step is float32 with
the same matmuls up to order, so 1e-5 relative is ~100x rounding and far below a missing or doubled
update (1e-2 or more here).

PEFT 0.21 adds the out_proj update twice (huggingface/peft#3774). The tests measure which factor the
installed PEFT uses (``peft_out_proj_factor``: 1 or 2, anything else fails), and compare with PEFT through
it: an adapter crosses between the libraries unchanged, and outputs agree once the out_proj ``lora_B``
is scaled by that factor. Where PEFT is right (factor 1) that is plain parity.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")
from safetensors.torch import load_file, save_file  # noqa: E402

import peftfast  # noqa: E402
from peftfast.layers import LoraLayer  # noqa: E402
from peftfast.layers.mha import LoraMultiheadAttention  # noqa: E402

from helpers import assert_rel_close  # noqa: E402
from peft_roundtrip import TOL, WEIGHTS, trainable  # noqa: E402
from tiny import assert_unchanged, snapshot  # noqa: E402

E, HEADS = 12, 3
OUT_B = "base_model.model.mha.base_layer.out_proj.lora_B.weight"


class AttnNet(nn.Module):
    """One self-attention (biases on, odd sizes) feeding a linear head."""

    def __init__(self, batch_first: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(E, HEADS, batch_first=batch_first)
        with torch.no_grad():
            self.mha.in_proj_bias.uniform_(-0.5, 0.5)
            self.mha.out_proj.bias.uniform_(-0.5, 0.5)
        self.head = nn.Linear(E, 5)

    def forward(self, x, key_padding_mask=None):
        return self.head(self.mha(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0])


X = torch.randn(2, 7, E, generator=torch.Generator().manual_seed(7))
MASK = torch.tensor([[False] * 7, [False] * 5 + [True] * 2])  # the second sequence has two padded keys


def attention(net: AttnNet, x, w_in, w_out, mask=None):
    """The hand-written oracle: multi-head self-attention with the given projection weights."""
    mha = net.mha
    b, n, _ = x.shape
    d = E // HEADS
    q, k, v = (x @ w_in.t() + mha.in_proj_bias).split(E, dim=-1)  # [B, N, E] each
    q, k, v = (t.reshape(b, n, HEADS, d).transpose(1, 2) for t in (q, k, v))  # [B, H, N, d]
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # [B, H, N, N]
    if mask is not None:
        scores = scores.masked_fill(mask[:, None, None, :], float("-inf"))
    o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, E)
    return net.head(o @ w_out.t() + mha.out_proj.bias)


def factors(model) -> dict:
    """The adapter tensors (A, B for in_proj and out_proj) and scaling, from either library's model."""
    mha = model.base_model.model.mha if hasattr(model, "base_model") else model.mha
    out = mha.base_layer.out_proj
    return dict(a=mha.lora_A["default"].weight, b=mha.lora_B["default"].weight, oa=out.lora_A["default"].weight,
                ob=out.lora_B["default"].weight, s=mha.scaling["default"])


def oracle(base: AttnNet, f: dict, out_factor: float = 1.0, mask=None):
    w_in = base.mha.in_proj_weight + f["s"] * f["b"] @ f["a"]
    w_out = base.mha.out_proj.weight + out_factor * f["s"] * f["ob"] @ f["oa"]
    return attention(base, X, w_in, w_out, mask)


def peft_out_proj_factor(pm) -> float:
    """How many times the installed PEFT adds the out_proj update (1 as defined; 2 in PEFT 0.21)."""
    with torch.no_grad():
        got = pm(X)
        for k in (1.0, 2.0):
            if torch.allclose(got, oracle(AttnNet(), factors(pm), k), rtol=1e-5, atol=1e-6):
                return k
    raise AssertionError("PEFT's MultiheadAttention output matches neither W + sBA nor W + 2sBA on out_proj")


def _scaled_file(src, dst, factor: float) -> None:
    """A copy of adapter directory ``src`` with the out_proj lora_B multiplied by ``factor``."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != WEIGHTS:
            (dst / f.name).write_bytes(f.read_bytes())
    sd = load_file(src / WEIGHTS)
    sd[OUT_B] = sd[OUT_B] * factor
    save_file(sd, dst / WEIGHTS, metadata={"format": "pt"})


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_lora_mha_matches_the_math_and_peft(tmp_path, bias):
    cfg = dict(r=4, lora_alpha=8, target_modules=["mha"], init_lora_weights=False, bias=bias)
    pm = peft.get_peft_model(AttnNet(), peft.LoraConfig(**cfg))
    pm.save_pretrained(tmp_path / "peft")
    k = peft_out_proj_factor(pm)

    # PEFT's file loads unchanged; outputs are the math's (and PEFT's once its out_proj factor is undone)
    ours = peftfast.load_adapter(AttnNet(), tmp_path / "peft", is_trainable=True)
    assert isinstance(ours.mha, LoraMultiheadAttention) and isinstance(ours.mha.base_layer.out_proj, LoraLayer)
    with torch.no_grad():
        got = ours(X)
        assert (got - AttnNet()(X)).abs().max() > 1e-2, "adapter is a no-op: vacuous test"
        assert_rel_close(got, oracle(AttnNet(), factors(pm)), TOL, "outputs vs the math")
    _scaled_file(tmp_path / "peft", tmp_path / "peft_as_ours", k)
    with torch.no_grad():
        assert_rel_close(peftfast.load_adapter(AttnNet(), tmp_path / "peft_as_ours")(X), pm(X), TOL,
                         "PEFT adapter (out_proj B x PEFT's factor) in peftfast vs PEFT")

    # peftfast's file: PEFT's keys and tensors; in PEFT, the same outputs once PEFT's factor is undone
    peftfast.save_adapter(ours, tmp_path / "ours")
    theirs_sd, ours_sd = load_file(tmp_path / "peft" / WEIGHTS), load_file(tmp_path / "ours" / WEIGHTS)
    assert sorted(ours_sd) == sorted(theirs_sd)
    for key in theirs_sd:
        assert torch.equal(ours_sd[key], theirs_sd[key]), key
    if bias != "none":  # PEFT trains (and saves) out_proj's bias, never in_proj_bias (not named "bias")
        assert "base_model.model.mha.base_layer.out_proj.base_layer.bias" in ours_sd
        assert not any("in_proj_bias" in key for key in ours_sd)
    _scaled_file(tmp_path / "ours", tmp_path / "ours_for_peft", 1.0 / k)
    with torch.no_grad():
        assert_rel_close(peft.PeftModel.from_pretrained(AttnNet(), tmp_path / "ours_for_peft")(X), got, TOL,
                         "peftfast adapter (out_proj B / PEFT's factor) in PEFT")

    assert trainable(ours) == trainable(pm), "trainable parameters, loaded adapter"
    fresh = peftfast.patch(AttnNet(), peftfast.LoraConfig(**cfg))
    assert trainable(fresh) == trainable(peft.get_peft_model(AttnNet(), peft.LoraConfig(**cfg)))

    # training against the oracle with its own leaf copies of the adapter (and of the trained bias)
    ref = AttnNet()
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in factors(ours).items() if n != "s"}
    ref_params = list(leaves.values())
    for trained_bias in ([ref.mha.out_proj.bias] if bias != "none" else []) + ([ref.head.bias] if bias == "all" else []):
        ref_params.append(trained_bias.requires_grad_(True))
    opt_r = torch.optim.AdamW(ref_params, lr=1e-2)
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    assert sum(p.numel() for p in ref_params) == trainable(ours)
    for step in range(3):
        lr_ = oracle(ref, dict(leaves, s=factors(ours)["s"]), mask=MASK).square().mean()
        lo = ours(X, key_padding_mask=MASK).square().mean()
        assert_rel_close(lo.detach(), lr_.detach(), TOL, f"loss, step {step}")
        for opt, loss in ((opt_r, lr_), (opt_o, lo)):
            opt.zero_grad()
            loss.backward()
            opt.step()
    for name, leaf in leaves.items():
        assert_rel_close(factors(ours)[name].detach(), leaf.detach(), TOL, f"trained {name}")
    with torch.no_grad():
        trained = ours(X)
        assert (trained - got).abs().max() > 1e-4, "training moved nothing: vacuous test"
        peftfast.merge(ours)
        assert_rel_close(ours(X), trained, TOL, "merged")
        peftfast.unmerge(ours)
        assert_rel_close(ours(X), trained, TOL, "unmerged")


def test_lora_mha_passes_every_argument_through():
    """Sequence-first layout, padding mask and attention weights: with the out_proj update at zero the
    installed PEFT is right whatever its factor, so the whole tuple must equal PEFT's."""
    x = X.transpose(0, 1)  # [N, B, E]
    cfg = dict(r=4, lora_alpha=8, target_modules=["mha"], init_lora_weights=False)
    pm = peft.get_peft_model(AttnNet(batch_first=False), peft.LoraConfig(**cfg))
    with torch.no_grad():
        pm.base_model.model.mha.base_layer.out_proj.lora_B["default"].weight.zero_()
    ours = peftfast.patch(AttnNet(batch_first=False), peftfast.LoraConfig(**cfg))
    ours.load_state_dict({k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()})
    with torch.no_grad():
        for kwargs in (dict(key_padding_mask=MASK, need_weights=True), dict(need_weights=True,
                                                                             average_attn_weights=False)):
            theirs = pm.base_model.model.mha(x, x, x, **kwargs)
            mine = ours.mha(x, x, x, **kwargs)
            assert (theirs[0] - AttnNet(batch_first=False).mha(x, x, x, **kwargs)[0]).abs().max() > 1e-2
            for t, m, what in zip(theirs, mine, ("output", "attention weights")):
                assert_rel_close(m, t, TOL, f"{what} {sorted(kwargs)}")
    assert ours.mha.batch_first is False and ours.mha.num_heads == HEADS  # the base's settings read through


def test_lora_mha_unpatch_restores_and_disable_gives_the_base():
    model = AttnNet()
    snap = snapshot(model)
    base_out = AttnNet()(X)
    peftfast.patch(model, peftfast.LoraConfig(r=2, target_modules=["mha"], init_lora_weights=False))
    with torch.no_grad():
        assert (model(X) - base_out).abs().max() > 1e-2
        with peftfast.disable_adapters(model):
            assert_rel_close(model(X), base_out, TOL, "disabled")
        peftfast.merge(model, keep_original=True)
        with peftfast.disable_adapters(model):  # disabling a merged model unmerges it, as PEFT
            assert_rel_close(model(X), base_out, TOL, "disabled after merge")
    peftfast.unpatch(model)
    assert type(model.mha) is nn.MultiheadAttention and type(model.mha.out_proj) is not LoraLayer
    assert_unchanged(model, snap)
    # merge_and_unload: the plain module with both updates folded in
    patched = peftfast.patch(AttnNet(), peftfast.LoraConfig(r=2, target_modules=["mha"], init_lora_weights=False))
    with torch.no_grad():
        expected = patched(X)
        merged = peftfast.unpatch(patched, merge_adapters=True)
        assert type(merged.mha) is nn.MultiheadAttention and isinstance(merged.mha.out_proj, nn.Linear)
        assert not isinstance(merged.mha.out_proj, LoraLayer)
        assert_rel_close(merged(X), expected, TOL, "merged and unloaded")


def test_lora_mha_refusals_leave_the_model_unchanged():
    class KV(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True)

    for build, cfg, match in (
        (AttnNet, dict(use_dora=True), "DoRA on nn.MultiheadAttention"),
        (AttnNet, dict(lora_bias=True), "lora_bias=True on nn.MultiheadAttention"),
        (KV, {}, "same size"),
    ):
        model = build()
        snap = snapshot(model)
        with pytest.raises(ValueError, match=match):
            peftfast.patch(model, peftfast.LoraConfig(r=2, target_modules=["mha"], **cfg))
        assert_unchanged(model, snap)
        assert type(model.mha.out_proj) is not LoraLayer
    with pytest.raises(ValueError):  # PEFT refuses these two as well
        peft.get_peft_model(AttnNet(), peft.LoraConfig(r=2, target_modules=["mha"], use_dora=True))
    with pytest.raises(ValueError):
        peft.get_peft_model(KV(), peft.LoraConfig(r=2, target_modules=["mha"]))
    # out_proj alone: torch's attention never calls it, so the adapter would train nothing
    model = AttnNet()
    for targets in (["out_proj"], "all-linear"):
        with pytest.raises(peftfast.ConfigError, match="out_proj of an nn.MultiheadAttention"):
            peftfast.patch(model, peftfast.LoraConfig(r=2, target_modules=targets))
        assert type(model.mha.out_proj) is not LoraLayer
    with pytest.warns(UserWarning, match="lora_dropout=0.1 does not apply"):
        peftfast.patch(AttnNet(), peftfast.LoraConfig(r=2, target_modules=["mha"], lora_dropout=0.1))


def test_lora_mha_second_adapter_and_set_adapter():
    model = peftfast.patch(AttnNet(), peftfast.LoraConfig(r=2, target_modules=["mha"], init_lora_weights=False))
    first = model(X).detach()
    peftfast.patch(model, peftfast.LoraConfig(r=3, target_modules=["mha"], init_lora_weights=False),
                   adapter_name="other")
    out = model.mha.base_layer.out_proj
    assert set(out.lora_A) == {"default", "other"}
    peftfast.set_adapter(model, "other")
    assert not model.mha.lora_A["default"].weight.requires_grad and out.lora_A["other"].weight.requires_grad
    with torch.no_grad():
        f = {"a": model.mha.lora_A["other"].weight, "b": model.mha.lora_B["other"].weight,
             "oa": out.lora_A["other"].weight, "ob": out.lora_B["other"].weight, "s": model.mha.scaling["other"]}
        assert_rel_close(model(X), oracle(AttnNet(), f), TOL, "second adapter")
        peftfast.set_adapter(model, "default")
        assert_rel_close(model(X), first, TOL, "back to the first")
