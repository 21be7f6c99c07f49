"""LoRA initializations from the base weight (issue 17 item 4), each against Hugging Face PEFT.

PiSSA (full SVD, and ``pissa_niter_<n>``'s randomized SVD) and OLoRA: peftfast runs PEFT's operations in
PEFT's order, so the same base and config give bit-identical lora_A, lora_B and residual base weight
(``torch.equal``, not a tolerance); the randomized SVD draws from the global RNG, and both sides create
their adapter layers in the same order, so seeding both the same way gives the same draws. Then: the
adapters load across the two libraries (PEFT re-derives the residual from the original base on load, so
does peftfast), train to the same losses, and PEFT's ``path_initial_model_for_weight_conversion``
conversion gives the same file as peftfast's. Logit tolerances are float32 ones: 1e-5 relative is ~100x
the reordering of float32 sums, far below any wrong sign, scale or transpose (1e-2 and more). Also the
transaction rules: a failed ``patch`` and ``unpatch`` put the original base weight back bit for bit.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

import peftfast  # noqa: E402
from peftfast.layers import LoraLayer  # noqa: E402

from helpers import assert_rel_close, train_side_by_side  # noqa: E402
from tiny import assert_unchanged, snapshot, tiny_llama  # noqa: E402

TOL = 1e-5
WEIGHTS = "adapter_model.safetensors"
TARGETS = ["q_proj", "v_proj", "down_proj"]
INITS = ["pissa", "pissa_niter_2", "olora"]


def _cfg(init, **kw):
    return dict(dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init), **kw)


def _ids():
    return torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(3))


def _both(build, cfg, seed=5):
    """PEFT's model and peftfast's from two copies of one base, each right after its RNG is seeded alike."""
    torch.manual_seed(seed)
    pm = peft.get_peft_model(build(), peft.LoraConfig(**cfg))
    torch.manual_seed(seed)
    ours = peftfast.patch(build(), peftfast.LoraConfig(**cfg), backend="reference")
    return pm, ours


def _pairs(pm, ours):
    theirs = dict(pm.named_modules())
    for name, layer in ours.named_modules():
        if isinstance(layer, LoraLayer):
            yield name, theirs["base_model.model." + name], layer


def _assert_same_init(pm, ours):
    pairs = list(_pairs(pm, ours))
    assert pairs
    for name, p, o in pairs:
        for attr in ("lora_A", "lora_B"):
            a, b = getattr(p, attr)["default"].weight, getattr(o, attr)["default"].weight
            assert a.dtype == b.dtype and torch.equal(a, b), f"{name}.{attr}"
        assert p.base_layer.weight.dtype == o.base_layer.weight.dtype
        assert torch.equal(p.base_layer.weight, o.base_layer.weight), f"{name}: residual base weight"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("init", INITS)
def test_init_is_pefts_bit_for_bit(init, dtype):
    base = tiny_llama()
    pm, ours = _both(lambda: copy.deepcopy(base).to(dtype), _cfg(init))
    _assert_same_init(pm, ours)
    layer = ours.model.layers[0].self_attn.q_proj
    # the principal part moved into the adapter: the base changed by s*B@A, and the model did not
    w0 = base.model.layers[0].self_attn.q_proj.weight.to(dtype)
    assert (layer.base_layer.weight.float() - w0.float()).abs().max() > 1e-2
    if dtype == torch.float32:
        with torch.no_grad():
            assert_rel_close(ours(_ids()).logits, base(_ids()).logits, TOL, "initialized model vs base")
            assert_rel_close(ours(_ids()).logits, pm(_ids()).logits, TOL, "peftfast vs PEFT")


def test_pissa_on_conv1d_and_with_dora_is_pefts():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16, bos_token_id=1,
                                      eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    pm, ours = _both(lambda: copy.deepcopy(gpt2), dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                       init_lora_weights="pissa"))
    _assert_same_init(pm, ours)
    with torch.no_grad():
        assert_rel_close(ours(_ids()).logits, gpt2(_ids()).logits, TOL, "GPT-2 PiSSA vs base")
    base = tiny_llama()
    pm, ours = _both(lambda: copy.deepcopy(base), _cfg("pissa", use_dora=True))
    _assert_same_init(pm, ours)
    for name, p, o in _pairs(pm, ours):
        assert_rel_close(o.lora_magnitude_vector["default"].weight, p.lora_magnitude_vector["default"].weight, TOL,
                         f"{name} DoRA magnitude")


def test_olora_on_a_4bit_base_is_pefts():
    """PEFT decodes the 4-bit weight, decomposes it and quantizes the float32 residual: same packed bytes,
    same scales. Rows are whole 4-bit blocks (K = 64 / 128) and no eval forward ran before the init: there
    bitsandbytes' CPU decode is exact (see DESIGN.md), so PEFT's side is an oracle."""
    from models import quantize_4bit
    from peftfast.kernels import dequantize_4bit

    base = tiny_llama(hidden_size=64, intermediate_size=128)
    pm, ours = _both(lambda: quantize_4bit(copy.deepcopy(base)), _cfg("olora"))
    for name, p, o in _pairs(pm, ours):
        pw, ow = p.base_layer.weight, o.base_layer.weight
        assert torch.equal(p.lora_A["default"].weight, o.lora_A["default"].weight), name
        assert torch.equal(p.lora_B["default"].weight, o.lora_B["default"].weight), name
        assert torch.equal(pw.data, ow.data), f"{name}: packed residual"
        assert torch.equal(pw.quant_state.absmax, ow.quant_state.absmax), f"{name}: scales"
        assert torch.equal(pw.quant_state.state2.absmax, ow.quant_state.state2.absmax), f"{name}: nested scales"
    # the layer computes decode(W_res) x + s (x A^T) B^T
    layer = ours.model.layers[0].mlp.down_proj
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(4))
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    want = x @ dequantize_4bit(layer.base_layer.weight, dtype=torch.float32).t() + 2.0 * (x @ a.t()) @ b.t()
    with torch.no_grad():
        assert_rel_close(layer(x), want, TOL, "4-bit OLoRA layer")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_adapters_cross_load_and_train_as_in_peft(tmp_path, init):
    """Saved with its init method in the config, a PiSSA/OLoRA adapter loads onto the *original* base in
    either library (the loader re-derives the residual, then loads A and B); three AdamW steps agree."""
    base = tiny_llama()
    build = lambda: copy.deepcopy(base)  # noqa: E731
    pm, ours = _both(build, _cfg(init))
    ids = _ids()
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == peftfast.trainable_parameters(ours)[0]
    train_side_by_side(pm, ours, lambda m: m(ids).logits.square().mean(), TOL)
    with torch.no_grad():
        trained = ours(ids).logits
        assert (trained - base(ids).logits).abs().max() > 1e-3, "training moved nothing: vacuous test"
        assert_rel_close(trained, pm(ids).logits, TOL, "after training")
    pm.save_pretrained(tmp_path / "peft")
    peftfast.save_adapter(ours, tmp_path / "ours")
    theirs_sd, ours_sd = load_file(tmp_path / "peft" / WEIGHTS), load_file(tmp_path / "ours" / WEIGHTS)
    assert sorted(theirs_sd) == sorted(ours_sd)
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["init_lora_weights"] == init
    with torch.no_grad():
        assert_rel_close(peft.PeftModel.from_pretrained(build(), tmp_path / "ours")(ids).logits, trained, TOL,
                         "peftfast adapter in PEFT")
        assert_rel_close(peftfast.load_adapter(build(), tmp_path / "peft")(ids).logits, trained, TOL,
                         "PEFT adapter in peftfast")
        peftfast.merge(ours)
        assert_rel_close(ours(ids).logits, trained, TOL, "merged")
        peftfast.unmerge(ours)
        assert_rel_close(ours(ids).logits, trained, TOL, "unmerged")


def _train_alike(pm, ours, seed=7):
    """The same 'training' on both sides, bit for bit: one random step added to every A and B."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p, o in _pairs(pm, ours):
            for attr in ("lora_A", "lora_B"):
                tp, to = getattr(p, attr)["default"].weight, getattr(o, attr)["default"].weight
                step = 0.05 * torch.randn(tp.shape, generator=g)
                tp.add_(step)
                to.add_(step)


@pytest.mark.parametrize("init,rslora", [("pissa", False), ("olora", False), ("pissa", True)])
def test_conversion_to_plain_lora_is_pefts(tmp_path, init, rslora):
    base = tiny_llama()
    build = lambda: copy.deepcopy(base)  # noqa: E731
    pm, ours = _both(build, _cfg(init, use_rslora=rslora))
    pm.save_pretrained(tmp_path / "peft_init")
    peftfast.save_adapter(ours, tmp_path / "ours_init")
    _train_alike(pm, ours)
    ids = _ids()
    with torch.no_grad():
        trained = ours(ids).logits
    pm.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "peft_init"))
    peftfast.save_adapter(ours, tmp_path / "ours", path_initial_model_for_weight_conversion=tmp_path / "ours_init")
    theirs_sd, ours_sd = load_file(tmp_path / "peft" / WEIGHTS), load_file(tmp_path / "ours" / WEIGHTS)
    assert sorted(ours_sd) == sorted(theirs_sd)
    for key in theirs_sd:
        assert torch.equal(ours_sd[key], theirs_sd[key]), key
    assert ours_sd[sorted(ours_sd)[0]].shape[0] == 8  # rank 2r
    theirs_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for field in ("r", "lora_alpha", "init_lora_weights", "use_rslora"):
        assert ours_cfg[field] == theirs_cfg[field], field
    # the converted adapter applies to the original base and gives the trained model (the residual base's
    # float32 rounding aside)
    with torch.no_grad():
        assert_rel_close(peft.PeftModel.from_pretrained(build(), tmp_path / "ours")(ids).logits, trained, TOL,
                         "converted adapter in PEFT on the original base")
        assert_rel_close(peftfast.load_adapter(build(), tmp_path / "ours")(ids).logits, trained, TOL,
                         "converted adapter in peftfast on the original base")


def test_conversion_refuses_what_it_cannot_represent(tmp_path):
    base = tiny_llama()
    ours = peftfast.patch(copy.deepcopy(base), peftfast.LoraConfig(**_cfg("pissa", modules_to_save=["lm_head"])))
    peftfast.save_adapter(ours, tmp_path / "init")
    with pytest.raises(peftfast.ConfigError, match="besides lora_A/lora_B"):
        peftfast.save_adapter(ours, tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
    other = peftfast.patch(copy.deepcopy(base), peftfast.LoraConfig(**_cfg("pissa", target_modules=["q_proj"])))
    with pytest.raises(peftfast.ConfigError, match="does not match"):
        peftfast.save_adapter(other, tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
    plain = peftfast.patch(copy.deepcopy(base), peftfast.LoraConfig(**_cfg(False)))
    peftfast.save_adapter(plain, tmp_path / "plain_init")
    with pytest.raises(peftfast.ConfigError, match="init_lora_weights=False"):
        peftfast.save_adapter(plain, tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "plain_init")
    assert not (tmp_path / "out").exists()


# --- the transaction rules: the base weight an init replaced comes back bit for bit ------------------------


def _failing_cfg(init):
    # down_proj (32 x 48) cannot take rank 40: refused after the q/v layers before it were initialized
    return peftfast.LoraConfig(**_cfg(init, rank_pattern={"down_proj": 40}))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_failed_patch_leaves_the_model_as_it_was(init):
    model = tiny_llama()
    snap = snapshot(model)
    params = dict(model.named_parameters())
    with pytest.raises(peftfast.ConfigError, match="rank 40"):
        peftfast.patch(model, _failing_cfg(init))
    assert_unchanged(model, snap)
    assert all(p is params[n] for n, p in model.named_parameters()), "parameter objects replaced"
    # a second adapter's failed patch restores the first one's residual, not the original weight
    peftfast.patch(model, peftfast.LoraConfig(**_cfg(init)))
    snap = snapshot(model)
    with pytest.raises(peftfast.ConfigError, match="rank 40"):
        peftfast.patch(model, _failing_cfg(init), adapter_name="second")
    types, state, grads = snap
    now = snapshot(model)
    assert now[0] == types and now[2] == grads
    for k in state:
        assert torch.equal(now[1][k], state[k]), k


def test_failed_4bit_patch_and_unpatch_restore_the_quantized_weight():
    from models import quantize_4bit

    model = quantize_4bit(tiny_llama(hidden_size=64, intermediate_size=128))
    snap = snapshot(model)
    layers = {n: (m.weight, m.quant_state) for n, m in model.named_modules() if hasattr(m, "quant_state")}
    cfg = _cfg("olora", rank_pattern={"down_proj": 100})
    with pytest.raises(peftfast.ConfigError, match="rank 100"):
        peftfast.patch(model, peftfast.LoraConfig(**cfg))
    assert_unchanged(model, snap)
    peftfast.patch(model, peftfast.LoraConfig(**_cfg("olora")))
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight.data,
                           layers["model.layers.0.self_attn.q_proj"][0].data)
    peftfast.unpatch(model)
    assert_unchanged(model, snap)
    for n, m in model.named_modules():
        if n in layers:
            assert m.weight is layers[n][0] and m.quant_state is layers[n][1], n


@pytest.mark.parametrize("init", INITS)
def test_unpatch_restores_the_original_weight_bit_for_bit(init):
    model = tiny_llama()
    snap = snapshot(model)
    peftfast.patch(model, peftfast.LoraConfig(**_cfg(init)))
    peftfast.patch(model, peftfast.LoraConfig(**_cfg(init)), adapter_name="two")  # stacks a second residual
    peftfast.merge(model)
    peftfast.unpatch(model)
    assert_unchanged(model, snap)
    # merging instead keeps the trained model: W_res + s B A
    model = tiny_llama()
    peftfast.patch(model, peftfast.LoraConfig(**_cfg(init)))
    with torch.no_grad():
        for _, m in model.named_modules():
            if isinstance(m, LoraLayer):
                m.lora_B["default"].weight.mul_(1.5)
        trained = model(_ids()).logits
    peftfast.unpatch(model, merge_adapters=True)
    with torch.no_grad():
        assert_rel_close(model(_ids()).logits, trained, TOL, "merged and unloaded")


# --- refusals, each naming the problem and the way out ----------------------------------------------------


@pytest.mark.parametrize("value,match", [
    ("loftq", "needs loftq_config"),  # LoftQ itself: tests/test_lora_loftq.py
    ("corda", "not implemented in peftfast"),
    ("pissa_niter_-1", ">= 0"),
    ("PiSSA", "must be True, False"),
    ("svd", "must be True, False"),
])
def test_unknown_and_unimplemented_inits_are_refused_by_name(value, match):
    with pytest.raises(peftfast.ConfigError, match=match):
        peftfast.LoraConfig(init_lora_weights=value).validate()
    with pytest.raises(peftfast.ConfigError, match=match):
        peftfast.patch(tiny_llama(), {"peft_type": "LORA", "target_modules": ["q_proj"], "init_lora_weights": value})


def test_loftq_config_from_peft_patches_like_peftfasts():
    cfg = dict(r=4, lora_alpha=4, target_modules=["q_proj"], init_lora_weights="loftq")
    theirs = peftfast.patch(tiny_llama(), peft.LoraConfig(**cfg, loftq_config=peft.LoftQConfig(loftq_iter=2)))
    ours = peftfast.patch(tiny_llama(), peftfast.LoraConfig(**cfg, loftq_config={"loftq_bits": 4, "loftq_iter": 2}))
    assert peftfast.adapter_config(theirs).to_dict() == peftfast.adapter_config(ours).to_dict()
    a, b = theirs.model.layers[1].self_attn.q_proj, ours.model.layers[1].self_attn.q_proj
    assert torch.equal(a.base_layer.weight, b.base_layer.weight)
    assert not torch.equal(a.base_layer.weight, tiny_llama().model.layers[1].self_attn.q_proj.weight)


def test_bases_the_inits_cannot_take_are_refused():
    from models import quantize_4bit
    from transformers import GPT2Config, GPT2LMHeadModel

    four = quantize_4bit(tiny_llama(hidden_size=64, intermediate_size=128))
    snap = snapshot(four)
    with pytest.raises(peftfast.ConfigError, match="as PEFT does"):
        peftfast.patch(four, peftfast.LoraConfig(**_cfg("pissa")))
    assert_unchanged(four, snap)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16))
    with pytest.raises(peftfast.ConfigError, match="Conv1D"):
        peftfast.patch(gpt2, peftfast.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights="olora"))
    with pytest.raises(peftfast.ConfigError, match="float32, float16 or bfloat16"):
        peftfast.patch(tiny_llama().double(), peftfast.LoraConfig(**_cfg("olora")))

    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

    with pytest.raises(peftfast.ConfigError, match="linear layers only"):
        peftfast.patch(ConvNet(), peftfast.LoraConfig(r=2, target_modules=["conv"], init_lora_weights="pissa"))


def test_embeddings_get_pefts_default_init_under_pissa():
    """PEFT applies PiSSA to linear layers only; an embedding target gets its usual A = 0, B normal."""
    base = tiny_llama()
    cfg = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights="pissa")
    pm, ours = _both(lambda: copy.deepcopy(base), cfg)
    _assert_same_init(pm, ours)
    emb_p = pm.base_model.model.model.embed_tokens
    emb_o = ours.model.embed_tokens
    assert torch.equal(emb_o.lora_embedding_A["default"], emb_p.lora_embedding_A["default"])
    assert not emb_o.lora_embedding_A["default"].any()
