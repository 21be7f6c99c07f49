"""LoftQ initialization (``init_lora_weights="loftq"``, issue 17 item 4), checked against the math.

PEFT's own LoftQ (``peft/utils/loftq_utils.py``) runs only on a CUDA/XPU device, so on the CPU the first truth is
an independent float64 implementation of the algorithm written here from the paper (Li et al. 2023,
Algorithm 1, in PEFT's form): ``res = W``; T times: ``D = deq(NF4(res))`` with bitsandbytes' blockwise NF4
quantizer (blocksize 64, no nested scales, what PEFT's ``Params4bit`` call uses) decoded exactly in float64
by ``tests/bnb_oracle.py``; ``(A, B)`` the rank-r SVD of ``W - D`` split with the square roots of the
singular values; ``res = W - B A``. Tolerances:

* ``D``: the codes must be the same, so ``D`` agrees element-wise to a few float32 ulps (peftfast decodes in
  float32 as bitsandbytes does: ``code * absmax`` rounded once; after the first step the quantizer's float32
  input ``W - B A`` differs from the float64 one by ~1e-7 relative, which moves a block's absmax by as much).
  One code off would be a relative error of 3e-2 or more (the smallest gap in the NF4 table).
* ``B A``: float32 SVD against float64; a rank-r product is perturbed by ~eps32 * s_1 / (s_r - s_{r+1})
  (Wedin), so the bound is 50x that, computed from the spectrum. A wrong sign, scale or transpose is O(1).

Also: the error ||W - D - B A|| is below plain QLoRA's ||W - deq(NF4(W))|| and does not grow with the steps;
patch / unpatch / a failed patch leave the model as it was; the saved adapter has PEFT's keys and config, and
peftfast loads it back (onto the original base, re-running LoftQ, or onto the 4-bit LoftQ base); the one-shot
``replace_lora_weights_loftq`` for a 4-bit model. Parity with PEFT's own LoftQ: on the CPU, PEFT's installed
``loftq_init`` with its hard-coded CUDA/XPU device rewritten to the CPU at test time, and the ``gpu`` test as is.
"""
from __future__ import annotations

import copy
import json
import types

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from safetensors.torch import load_file, save_file  # noqa: E402

import peftfast  # noqa: E402
from peftfast.layers import LoraLayer  # noqa: E402
from peftfast.lora_init import loftq_decompose, nf4_roundtrip, replace_lora_weights_loftq  # noqa: E402

from bnb_oracle import decode_4bit  # noqa: E402
from helpers import assert_rel_close  # noqa: E402
from tiny import assert_unchanged, snapshot, tiny_llama  # noqa: E402

EPS32 = 2.0 ** -24
TARGETS = ["q_proj", "v_proj", "down_proj"]
TOL = 1e-5  # float32 logits: ~100x the reordering of float32 sums


def _cfg(iters=2, **kw):
    return dict(dict(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="loftq",
                     loftq_config={"loftq_bits": 4, "loftq_iter": iters}), **kw)


def _ids():
    return torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(3))


def reference_loftq(w: torch.Tensor, r: int, iters: int) -> tuple:
    """The algorithm in float64 (the quantizer takes float32, as bitsandbytes does): ``(D, A, B, S)``."""
    w64, res = w.double(), w.float()
    for _ in range(iters):
        packed, state = bnb.functional.quantize_4bit(res.contiguous(), blocksize=64, compress_statistics=False,
                                                     quant_type="nf4")
        d = decode_4bit(types.SimpleNamespace(data=packed, quant_state=state))
        u, s, vh = torch.linalg.svd(w64 - d, full_matrices=False)
        b, a = u[:, :r] * s[:r].sqrt(), s[:r].sqrt()[:, None] * vh[:r]
        res = (w64 - b @ a).float()
    return d, a, b, s


def _codes_and_scales(d: torch.Tensor) -> tuple:
    """``Q`` read back from ``deq(Q)``: each block's absmax is its largest |value| (the code table holds -1
    and 1, and the element that set the absmax takes one of them exactly), the codes the nearest entries."""
    flat = d.double().reshape(-1)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 64)]).view(-1, 64)
    scales = flat.abs().amax(1)
    table = bnb.functional.get_4bit_type("nf4", device="cpu").double()
    ratio = flat / scales.clamp_min(1e-30)[:, None]
    return (ratio[..., None] - table).abs().argmin(-1).reshape(-1)[:d.numel()], scales


def _assert_matches_reference(d, a, b, w, r, iters, what):
    ref_d, ref_a, ref_b, s = reference_loftq(w, r, iters)
    bound = 50 * EPS32 * (1 + (s[0] / (s[r - 1] - s[r])).item())
    codes, scales = _codes_and_scales(d)
    ref_codes, ref_scales = _codes_and_scales(ref_d)
    assert torch.equal(codes, ref_codes), f"{what}: the 4-bit codes differ from the float64 oracle's"
    # step 1 quantizes W itself: the same scales, decoded with one float32 rounding; later steps quantize
    # W - B A, whose float32 B A is within `bound` of the oracle's (relative): the scales move as much
    rel = ((d.double() - ref_d).abs() / ref_d.abs().clamp_min(1e-30)).max().item()
    assert rel <= (EPS32 if iters == 1 else 4 * EPS32 + 10 * bound), f"{what}: deq(Q) is off ({rel:.3g})"
    assert ((scales - ref_scales).abs() / ref_scales.clamp_min(1e-30)).max() <= (
        EPS32 if iters == 1 else 10 * bound), f"{what}: block scales are off"
    assert_rel_close((b.double() @ a.double()), ref_b @ ref_a, bound, f"{what}: B A")
    # PEFT's split: B = U sqrt(S), A = sqrt(S) Vh, so B^T B = A A^T = diag(S_r) (not U S / Vh, nor scaled)
    for gram in (b.double().t() @ b.double(), a.double() @ a.double().t()):
        assert (gram - torch.diag(s[:r])).abs().max() <= bound * s[0], f"{what}: A, B not split by sqrt(S)"


@pytest.mark.parametrize("shape,r,iters", [((45, 77), 5, 1), ((45, 77), 5, 4), ((64, 33), 3, 6), ((17, 130), 1, 2)])
def test_algorithm_matches_the_float64_oracle(shape, r, iters):
    """Odd shapes: blocks of 64 straddle rows and the last block is partial."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape) + iters)) * 0.02
    d, a, b = loftq_decompose(w, r, iters)
    assert d.dtype == a.dtype == b.dtype == torch.float32
    assert a.shape == (r, shape[1]) and b.shape == (shape[0], r)
    _assert_matches_reference(d, a, b, w, r, iters, f"{shape} r={r} T={iters}")


def test_error_is_below_qlora_and_does_not_grow_with_the_steps():
    w = torch.randn(40, 72, generator=torch.Generator().manual_seed(11)).double()
    w += torch.randn(40, 3, dtype=torch.float64) @ torch.randn(3, 72, dtype=torch.float64) * 0.5  # outlier directions
    w = w.float()
    qlora = (w.double() - nf4_roundtrip(w).double()).norm().item()
    errors = []
    for iters in range(1, 6):
        d, a, b = loftq_decompose(w, 4, iters)
        errors.append((w.double() - d.double() - b.double() @ a.double()).norm().item())
    # step 1 is a theorem (B A is the best rank-r fit of W - D, D the QLoRA base); the later steps are empirical
    assert errors[0] < qlora
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0], f"the alternating steps gained nothing: {errors}"


def test_quantizing_the_loftq_base_gives_back_q():
    """The base LoftQ leaves is deq(Q); bitsandbytes' NF4 of it (the same settings) decodes to it exactly, so
    PEFT's workflow (save that base, load it in 4-bit) reproduces Q."""
    w = torch.randn(33, 96, generator=torch.Generator().manual_seed(2))
    d, _, _ = loftq_decompose(w, 3, 3)
    assert torch.equal(nf4_roundtrip(d), d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_model_holds_the_oracles_base_and_adapter(dtype):
    base = tiny_llama().to(dtype)
    originals = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith(tuple(TARGETS))}
    model = peftfast.patch(copy.deepcopy(base), peftfast.LoraConfig(**_cfg(3)), backend="reference")
    seen = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        seen += 1
        w = originals[name]
        d, a, b = loftq_decompose(w, 4, 3)  # the same float32 computation PEFT runs on the base's weight
        _assert_matches_reference(d, a, b, w.float(), 4, 3, name)
        assert layer.base_layer.weight.dtype == dtype
        assert torch.equal(layer.base_layer.weight, d.to(dtype)), f"{name}: base is not deq(Q) in the base's dtype"
        # PEFT moves A, B to the base's dtype and autocasts them back to float32
        for got, want in ((layer.lora_A["default"].weight, a), (layer.lora_B["default"].weight, b)):
            assert torch.equal(got.float(), want.to(dtype).float()), name
    assert seen == 6
    with torch.no_grad():  # the patched model is the LoftQ approximation of the original (scaling 1)
        ids = _ids()
        err = (model(ids).logits.float() - base(ids).logits.float()).abs().max()
        assert 0 < err < 0.1


def test_scaling_is_not_folded_as_in_peft():
    base = tiny_llama()
    with pytest.warns(UserWarning, match="scaling"):
        model = peftfast.patch(copy.deepcopy(base), peftfast.LoraConfig(**_cfg(1, lora_alpha=8)))
    layer = model.model.layers[0].self_attn.q_proj
    d, a, b = loftq_decompose(base.model.layers[0].self_attn.q_proj.weight, 4, 1)
    assert layer.scaling["default"] == 2.0
    assert torch.equal(layer.lora_A["default"].weight, a) and torch.equal(layer.lora_B["default"].weight, b)


def test_dora_magnitude_is_taken_from_the_loftq_base():
    """PEFT runs DoRA's init after LoftQ replaced the base: the magnitude is ||deq(Q) + s B A|| per row."""
    model = peftfast.patch(tiny_llama(), peftfast.LoraConfig(**_cfg(2, use_dora=True)), backend="reference")
    layer = model.model.layers[1].mlp.down_proj
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    expected = (layer.base_layer.weight.double() + b @ a).norm(dim=1)
    assert_rel_close(layer.lora_magnitude_vector["default"].weight.double(), expected, 1e-6, "magnitude")


def test_config_fields_are_pefts():
    theirs = peft.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="loftq",
                             loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=3))
    ours = peftfast.as_config(theirs)
    assert ours.init_lora_weights == "loftq" and ours.loftq_config == theirs.loftq_config == {
        "loftq_bits": 4, "loftq_iter": 3}
    mine = peftfast.as_config(peftfast.LoraConfig(**_cfg(3, loftq_config=peftfast.LoftQConfig(loftq_iter=3))))
    assert mine.loftq_config == theirs.loftq_config
    with pytest.warns(UserWarning, match="ignored"):  # PEFT drops it for other inits, with a warning
        assert peftfast.as_config(dict(r=4, loftq_config={"loftq_bits": 4, "loftq_iter": 1})).loftq_config == {}


@pytest.mark.parametrize("change,match", [
    (dict(loftq_config={}), "needs loftq_config"),
    (dict(loftq_config={"loftq_bits": 8, "loftq_iter": 1}), "8-bit"),
    (dict(loftq_config={"loftq_bits": 2, "loftq_iter": 1}), "must be 4"),
    (dict(loftq_config={"loftq_bits": 4, "loftq_iter": 0}), ">= 1"),
    (dict(loftq_config={"loftq_bits": 4, "loftq_iters": 2}), "unknown fields"),
    (dict(target_modules=["embed_tokens", "q_proj"]), "linear layers only"),
])
def test_bad_loftq_configs_are_refused_and_leave_the_model(change, match):
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(peftfast.ConfigError, match=match):
        peftfast.patch(model, peftfast.LoraConfig(**_cfg(1, **change)))
    assert_unchanged(model, snap)


def test_bases_loftq_cannot_take_are_refused():
    from models import quantize_4bit
    from transformers import GPT2Config, GPT2LMHeadModel

    four = quantize_4bit(tiny_llama(hidden_size=64, intermediate_size=128))
    snap = snapshot(four)
    with pytest.raises(peftfast.ConfigError, match="4-bit already"):
        peftfast.patch(four, peftfast.LoraConfig(**_cfg(1)))
    assert_unchanged(four, snap)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16))
    with pytest.raises(peftfast.ConfigError, match="Conv1D"):
        peftfast.patch(gpt2, peftfast.LoraConfig(r=2, lora_alpha=2, target_modules=["c_attn"],
                                                 init_lora_weights="loftq", loftq_config={"loftq_bits": 4}))
    with pytest.raises(peftfast.ConfigError, match="float32, float16 or bfloat16"):
        peftfast.patch(tiny_llama().double(), peftfast.LoraConfig(**_cfg(1)))


def test_failed_patch_and_unpatch_put_the_original_weights_back():
    model = tiny_llama()
    snap = snapshot(model)
    params = dict(model.named_parameters())
    # down_proj (32 x 48) cannot take rank 40: refused after the q/v layers before it were initialized
    with pytest.raises(peftfast.ConfigError, match="rank 40"):
        peftfast.patch(model, peftfast.LoraConfig(**_cfg(2, rank_pattern={"down_proj": 40})))
    assert_unchanged(model, snap)
    assert all(p is params[n] for n, p in model.named_parameters()), "parameter objects replaced"
    peftfast.patch(model, peftfast.LoraConfig(**_cfg(2)))
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight, params[
        "model.layers.0.self_attn.q_proj.weight"].detach().clone().zero_()), "sanity"
    peftfast.unpatch(model)
    assert_unchanged(model, snap)
    assert all(p is params[n] for n, p in model.named_parameters()), "parameter objects replaced"


def test_save_has_pefts_keys_and_loads_back(tmp_path):
    base = tiny_llama()
    ours = peftfast.patch(copy.deepcopy(base), peftfast.LoraConfig(**_cfg(2)), backend="reference")
    with torch.no_grad():  # "training": move every adapter weight
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
        trained = ours(_ids()).logits
    peftfast.save_adapter(ours, tmp_path / "ours")
    # PEFT's keys for the same targets (its LoftQ cannot run on the CPU; the key set does not depend on the init)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**_cfg(2, init_lora_weights=True)))
    pm.save_pretrained(tmp_path / "peft")
    assert sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == sorted(
        load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "loftq" and saved["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}
    expected = peft.LoraConfig(**_cfg(2, loftq_config=peft.LoftQConfig(loftq_iter=2))).to_dict()
    assert expected["loftq_config"] == saved["loftq_config"]
    peftfast.save_adapter(ours, tmp_path / "init")  # (not right after patch: only the refusal matters here)
    with pytest.raises(peftfast.ConfigError, match="cannot be converted"):
        peftfast.save_adapter(ours, tmp_path / "conv", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert not (tmp_path / "conv").exists()
    with torch.no_grad():
        # onto the original base: LoftQ runs again (deterministic), then the trained A, B are loaded, as in PEFT
        again = peftfast.load_adapter(copy.deepcopy(base), tmp_path / "ours", backend="reference")
        assert torch.equal(again(_ids()).logits, trained)
        # onto the 4-bit LoftQ base (PEFT's workflow): init true, as PEFT's LoftQ example saves it
        from models import quantize_4bit

        dense_loftq = copy.deepcopy(base)
        for name, layer in ours.named_modules():
            if isinstance(layer, LoraLayer):
                dense_loftq.get_submodule(name).weight.data.copy_(layer.base_layer.weight)
        four = quantize_4bit(dense_loftq, nested=False)
        with pytest.raises(peftfast.ConfigError, match="adapter_config.json"):
            peftfast.load_adapter(four, tmp_path / "ours")
        saved["init_lora_weights"] = True
        (tmp_path / "ours" / "adapter_config.json").write_text(json.dumps(saved))
        four = peftfast.load_adapter(four, tmp_path / "ours", backend="reference")
        for name, layer in four.named_modules():
            if isinstance(layer, LoraLayer):
                assert torch.equal(decode_4bit(layer.base_layer.weight).float(),
                                   ours.get_submodule(name).base_layer.weight), f"{name}: Q not reproduced"
        # the targets hold exactly Q (above); the other linears are 4-bit here but dense in `ours`, so the
        # logits differ by those layers' quantization error only
        assert (four(_ids()).logits - trained).abs().max() < 0.1


# --- PEFT's replace_lora_weights_loftq: the base is 4-bit already, A and B from one SVD -------------------


def _four_bit_model():
    from models import quantize_4bit

    dense = tiny_llama(hidden_size=64, intermediate_size=96)
    weights = {n + ".weight": m.weight.detach().clone() for n, m in dense.named_modules() if n.endswith(tuple(TARGETS))}
    four = quantize_4bit(copy.deepcopy(dense), compute_dtype=torch.bfloat16)
    model = peftfast.patch(four, peftfast.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS), backend="reference")
    return model, weights


def test_replace_lora_weights_loftq_is_the_one_shot_svd(tmp_path):
    model, weights = _four_bit_model()
    save_file(weights, str(tmp_path / "model.safetensors"))
    replaced = replace_lora_weights_loftq(model, tmp_path)
    assert len(replaced) == 6
    for name in replaced:
        layer = model.get_submodule(name)
        w = weights[name + ".weight"].double()
        # PEFT subtracts bitsandbytes' dequantize_4bit, which returns the dtype in the quant state
        state_dtype = layer.base_layer.weight.quant_state.dtype
        d = decode_4bit(layer.base_layer.weight).to(state_dtype).double()
        u, s, vh = torch.linalg.svd(w - d, full_matrices=False)
        b, a = layer.lora_B["default"].weight.double(), layer.lora_A["default"].weight.double()
        bound = 50 * EPS32 * (1 + (s[0] / (s[3] - s[4])).item())
        assert_rel_close(b @ a, (u[:, :4] * s[:4]) @ vh[:4], bound, name)
        assert (w - d - b @ a).norm() < (w - d).norm()


def test_replace_lora_weights_loftq_rolls_back():
    model, weights = _four_bit_model()
    snap = snapshot(model)
    with pytest.raises(peftfast.ConfigError, match="down_proj.weight is not in"):
        replace_lora_weights_loftq(model, {k: v for k, v in weights.items() if "layers.1.mlp" not in k})
    now = snapshot(model)  # (the model is patched: assert_unchanged would object to the bookkeeping)
    assert now[0] == snap[0] and now[2] == snap[2] and now[1].keys() == snap[1].keys()
    for key, value in snap[1].items():
        assert torch.equal(now[1][key], value), f"{key} changed by a failed replace_lora_weights_loftq"
    # the callback refuses every other layer: those keep their A and B
    calls = []
    kept = replace_lora_weights_loftq(model, weights, callback=lambda m, n: calls.append(n) or len(calls) % 2 == 0)
    assert len(calls) == 6 and kept == calls[1::2]
    state = model.state_dict()
    for name in calls[0::2]:
        assert torch.equal(state[name + ".lora_A.default.weight"], snap[1][name + ".lora_A.default.weight"])
    for name in kept:
        assert not torch.equal(state[name + ".lora_B.default.weight"], snap[1][name + ".lora_B.default.weight"])
    with pytest.raises(peftfast.ConfigError, match="4-bit base"):
        replace_lora_weights_loftq(peftfast.patch(tiny_llama(), peftfast.LoraConfig(target_modules=TARGETS)), weights)


# --- parity with PEFT's own LoftQ, which needs CUDA (for a GPU session) ----------------------------------


def _assert_like_pefts_loftq(base, iters: int, backend: str = "auto") -> None:
    """peftfast's LoftQ and PEFT's on copies of ``base`` (on its device): the quantized base to a few float32
    ulps (the same NF4 codes from the same quantizer), ``B A`` to float32-SVD accuracy (and not zero), the
    logits to 1e-4; every target layer seen."""
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**_cfg(iters)))
    ours = peftfast.patch(copy.deepcopy(base), peftfast.LoraConfig(**_cfg(iters)), backend=backend)
    theirs = dict(pm.named_modules())
    seen = 0
    for name, layer in ours.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        other = theirs["base_model.model." + name]
        assert_rel_close(layer.base_layer.weight, other.base_layer.weight, 8 * EPS32, f"{name} base")
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        theirs_ba = other.lora_B["default"].weight @ other.lora_A["default"].weight
        assert_rel_close(b @ a, theirs_ba, 1e-4, name)
        assert torch.count_nonzero(b @ a) > 0, f"{name}: LoftQ left a zero adapter"
        seen += 1
    assert seen == sum(n.endswith(tuple(TARGETS)) for n, _ in base.named_modules()) > 0
    with torch.no_grad():
        ids = _ids().to(base.device)
        assert_rel_close(ours(ids).logits, pm(ids).logits, 1e-4, "logits")


@pytest.mark.gpu
@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_is_pefts_on_cuda(iters):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _assert_like_pefts_loftq(tiny_llama(hidden_size=64, intermediate_size=96).cuda(), iters)


# --- PEFT's own LoftQ on the CPU: its code, with its hard-coded compute device rewritten at test time ---------

_PEFT_DEVICE_LINE = 'compute_device = "xpu" if is_xpu_available() else "cuda"'


def _pefts_loftq_init_on_cpu():
    """PEFT's ``loftq_init``, compiled from its installed source with the one line that picks a CUDA/XPU
    device replaced by ``"cpu"`` (bitsandbytes quantizes and dequantizes NF4 on the CPU too). Skips when
    that line is not in the installed PEFT: the rewrite would then not be PEFT's algorithm."""
    import inspect
    import textwrap

    from peft.utils import loftq_utils

    source = textwrap.dedent(inspect.getsource(loftq_utils.loftq_init))
    if source.count(_PEFT_DEVICE_LINE) != 1:
        pytest.skip("this PEFT's loftq_init picks its device differently; the CPU rewrite does not apply")
    namespace = dict(vars(loftq_utils))
    exec(compile(source.replace(_PEFT_DEVICE_LINE, 'compute_device = "cpu"'), loftq_utils.__file__, "exec"),
         namespace)
    return namespace["loftq_init"]


@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_is_pefts_on_cpu(iters, monkeypatch):
    """The same base, adapter and logits as PEFT's own LoftQ run on the CPU: the quantized base to a few
    float32 ulps (the same NF4 codes), ``B A`` to float32-SVD accuracy, the logits to float32 rounding."""
    from peft.tuners.lora import layer as peft_lora_layer

    monkeypatch.setattr(peft_lora_layer, "loftq_init", _pefts_loftq_init_on_cpu())
    _assert_like_pefts_loftq(tiny_llama(hidden_size=64, intermediate_size=96), iters, backend="reference")
