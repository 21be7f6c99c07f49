"""Every state bitsandbytes can leave a 4-bit weight in is read right, checked against an fp32 oracle.

bitsandbytes >= 0.49 repacks a ``Linear4bit`` in place the first time it runs an eval forward on a CPU
with AVX512-BF16 (another nibble order, bf16 scales transposed, nested state folded away), and turns it
back, lossily, in ``state_dict()``. Reading those bytes as the standard layout gave logits 20-50% off
with no error. The oracle here is an fp32 twin of the model holding the weights decoded independently
(tests/bnb_oracle.py) at the moment they are read, with the adapter applied by hand.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

import peftfast  # noqa: E402
from peftfast.kernels import nf4  # noqa: E402

from bnb_oracle import decode_4bit, dense_twin  # noqa: E402
from helpers import rel_err  # noqa: E402
from models import quantize_4bit  # noqa: E402

# fp32 end to end on both sides: only summation order differs
TOL = 2e-5


def _repacks_on_this_cpu() -> bool:
    lin = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4", device="cpu")
    lin.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4",
                                   module=lin)._quantize("cpu")
    with torch.no_grad():
        lin.eval()(torch.randn(2, 64))
    return bool(getattr(lin.weight.quant_state, "packing_format_for_cpu", False))


REPACKS = _repacks_on_this_cpu()
needs_repack = pytest.mark.skipif(
    not REPACKS, reason="this CPU/bitsandbytes does not repack 4-bit weights (no AVX512-BF16, or bitsandbytes < 0.49)")


def tiny_4bit_llama(seed: int = 0) -> nn.Module:
    """A tiny NF4 Llama whose every layer bitsandbytes can CPU-pack (N a multiple of 32, K of 64)."""
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return quantize_4bit(transformers.LlamaForCausalLM(cfg).float()).eval()


def inputs() -> dict:
    g = torch.Generator().manual_seed(3)
    return {"input_ids": torch.randint(1, 96, (2, 9), generator=g)}


LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
IA3 = dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
EVERY_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _patch(model: nn.Module, method: str, backend: str = "auto", every_linear: bool = False) -> nn.Module:
    """Patch, give the adapters non-trivial values, and keep bitsandbytes from repacking the layers peftfast
    did not wrap: those are bitsandbytes' own (packed, they compute in bf16, which the fp32 oracle is not
    meant to model); the wrapped ones are left as they are, since keeping them exact is what is tested."""
    if method == "lora":
        cfg = peftfast.LoraConfig(**dict(LORA, target_modules=EVERY_LINEAR if every_linear else LORA["target_modules"]))
    else:
        cfg = peftfast.IA3Config(**dict(IA3, target_modules=EVERY_LINEAR) if every_linear else IA3)
    peftfast.patch(model, cfg, backend=backend)
    wrapped = {id(m.base_layer) for m in model.modules() if isinstance(m, peftfast.layers.AdapterLayer)}
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and id(m) not in wrapped:
            m.support_avx512bf16_for_cpu = False
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # adapters that change the output (B = 0 / l = 1 would hide a misread base)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "ia3_l" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model.eval()


def _oracle(model: nn.Module, adapters_on: bool = True) -> nn.Module:
    """The fp32 twin of a patched 4-bit model: each wrapper replaced by its base, decoded now, with the
    adapter applied to that weight in float64 (LoRA: W + s B A; IA3: rows or columns scaled by l)."""
    from peftfast.layers import AdapterLayer

    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        if not isinstance(m, AdapterLayer):
            continue
        base = m.base_layer
        w = decode_4bit(base.weight)
        if adapters_on:
            for a in m.active_adapters:
                if hasattr(m, "lora_A"):
                    w = w + m.scaling[a] * (m.lora_B[a].weight.double() @ m.lora_A[a].weight.double())
                else:
                    l = m.ia3_l[a].double()
                    w = w * (l.view(1, -1) if m.is_feedforward else l.view(-1, 1))
        lin = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(w.float())
        parent, _, attr = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, attr, lin)
    return dense_twin(twin).eval()


def _logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).logits


# ------------------------------------------------------------------------------------------------------
# The weight view on each state
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(64, 128), (96, 320), (32, 64)])
def test_view_decodes_the_cpu_packed_layout_exactly(nested, quant_type, shape):
    """bitsandbytes' own repack of a weight, decoded by the view, equals the oracle's decode of those bytes,
    and is the standard decode with the scales rounded to bf16 (what the repack does, and all it does)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    p = bnb.nn.Params4bit(torch.randn(shape), requires_grad=False, quant_type=quant_type,
                          compress_statistics=nested, blocksize=64)._quantize("cpu")
    before = nf4.quant4bit_view(p)
    state = copy.deepcopy(p.quant_state)
    data, state = _convert_weight_packed_for_cpu(p.data.clone(), state)
    packed = bnb.nn.Params4bit(data, requires_grad=False, bnb_quantized=True, quant_state=state)
    assert state.packing_format_for_cpu and not state.nested
    view = nf4.quant4bit_view(packed)
    got = nf4.dequantize_4bit(view, dtype=torch.float32, backend="reference")
    assert torch.equal(got, decode_4bit(packed).float())  # fp32 code * scale: exact in fp64, rounded once
    assert torch.equal(view.packed, before.packed), "the codes must come back bit for bit"
    bf16_scales = nf4.block_scales_reference(before).to(torch.bfloat16).float()
    assert torch.equal(view.absmax, bf16_scales)
    assert view.dtype == p.quant_state.dtype, "the compute dtype recorded at quantization, not the repack's bf16"
    # the Triton decode (interpreted here) reads the same view
    assert torch.equal(nf4.dequantize_4bit(view, dtype=torch.float32, backend="triton"), got)


def test_cpu_packed_view_is_kept_until_the_packed_bytes_change():
    """The decoded copy of a CPU-packed weight is made once and reused; an in-place write to the packed
    bytes (the parameter's version moves) or new packed storage decodes again, to the new bytes."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    p = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, quant_type="nf4", blocksize=64)._quantize("cpu")
    data, state = _convert_weight_packed_for_cpu(p.data.clone(), copy.deepcopy(p.quant_state))
    original = data.clone()
    packed = bnb.nn.Params4bit(data, requires_grad=False, bnb_quantized=True, quant_state=state)
    first = nf4.quant4bit_view(packed)
    assert nf4.quant4bit_view(packed) is first
    with torch.no_grad():
        packed[:1] ^= 0x11  # changes both codes of every byte in the first row: the decode must follow
    second = nf4.quant4bit_view(packed)
    assert second is not first and not torch.equal(second.packed, first.packed)
    assert torch.equal(nf4.dequantize_4bit(second, dtype=torch.float32, backend="reference"),
                       decode_4bit(packed).float())
    packed.data = original  # new storage holding the original bytes
    assert torch.equal(nf4.quant4bit_view(packed).packed, first.packed)


def test_view_refuses_storage_its_state_does_not_describe():
    p = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, quant_type="nf4")._quantize("cpu")
    shard = bnb.nn.Params4bit(p.data[: p.data.shape[0] // 2].clone(), requires_grad=False, bnb_quantized=True,
                              quant_state=p.quant_state)
    with pytest.raises(ValueError, match="shard"):
        nf4.quant4bit_view(shard)
    odd = copy.deepcopy(p.quant_state)
    odd.packing_format_for_cpu = True  # claims the CPU layout, holds the standard one
    with pytest.raises(ValueError, match="CPU-packed"):
        nf4.quant4bit_view(bnb.nn.Params4bit(p.data.clone(), requires_grad=False, bnb_quantized=True,
                                             quant_state=odd))


# ------------------------------------------------------------------------------------------------------
# The sequences users run, each against the fp32 oracle
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_adapters_disabled_in_eval_then_enabled(method):
    """A DPO-style reference pass: disable the adapters, run in eval, run again with them."""
    model = _patch(tiny_4bit_llama(), method)
    x = inputs()
    oracle_on, oracle_off = _oracle(model), _oracle(model, adapters_on=False)
    with peftfast.disable_adapters(model):
        off = _logits(model, x)
    on = _logits(model, x)
    assert rel_err(off, _logits(oracle_off, x)) < TOL
    assert rel_err(on, _logits(oracle_on, x)) < TOL
    with peftfast.disable_adapters(model):
        assert torch.equal(_logits(model, x), off), "a second reference pass must give the first's logits"
    for m in model.modules():  # the adapted layers were not repacked behind peftfast's back
        if isinstance(m, peftfast.layers.AdapterLayer):
            assert not getattr(m.base_layer.weight.quant_state, "packing_format_for_cpu", False)


@needs_repack
@pytest.mark.parametrize("method", ["lora", "ia3"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_base_run_before_patch(method, backend):
    """A user looks at the base output first: every layer is CPU-packed before peftfast sees it."""
    model = tiny_4bit_llama()
    x = inputs()
    _logits(model, x)
    assert all(m.weight.quant_state.packing_format_for_cpu for m in model.modules()
               if isinstance(m, bnb.nn.Linear4bit))
    model = _patch(model, method, backend, every_linear=True)  # all packed: every layer must be peftfast's
    oracle = _oracle(model)  # decoded from the packed bytes: the weights as they now are
    assert rel_err(_logits(model, x), _logits(oracle, x)) < TOL
    with peftfast.disable_adapters(model):
        assert rel_err(_logits(model, x), _logits(_oracle(model, adapters_on=False), x)) < TOL


@pytest.mark.parametrize("method", ["lora", "ia3"])
@pytest.mark.parametrize("base_pass_first", [False, True])
def test_merge_after_a_disabled_pass(method, base_pass_first):
    """merge after a reference pass: the merged 4-bit weight is W + delta requantized as W was quantized."""
    model = tiny_4bit_llama()
    x = inputs()
    if base_pass_first:
        _logits(model, x)
    model = _patch(model, method, every_linear=base_pass_first)
    with peftfast.disable_adapters(model):
        _logits(model, x)
    expected = {}
    for name, m in model.named_modules():
        if isinstance(m, peftfast.layers.AdapterLayer):
            # what the merge must quantize: the exact decode plus the adapter, in fp32 as merge computes it
            w = decode_4bit(m.base_layer.weight).float()
            for a in m.active_adapters:
                if hasattr(m, "lora_A"):
                    w = w + m.delta_weight(a)
                else:
                    l = m.ia3_l[a].float()
                    w = w * (l.view(1, -1) if m.is_feedforward else l.view(-1, 1))
            how = nf4.quantization_settings(m.base_layer.weight)
            q = bnb.nn.Params4bit(w, requires_grad=False, quant_type=how["quant_type"], blocksize=how["blocksize"],
                                  compress_statistics=how["compress_statistics"])._quantize("cpu")
            expected[name] = decode_4bit(q)
    peftfast.merge(model)
    for name, m in model.named_modules():
        if name in expected:
            assert not getattr(m.base_layer.weight.quant_state, "packing_format_for_cpu", False)
            assert torch.equal(decode_4bit(m.base_layer.weight), expected[name]), name
    merged = _logits(model, x)
    oracle = dense_twin(model)  # every 4-bit layer decoded as it now is, wrappers merged (base only)
    assert rel_err(merged, _logits(oracle, x)) < TOL


def test_state_dict_round_trip_of_a_packed_weight_is_read_right():
    """bitsandbytes' state_dict() turns a packed weight back (re-nesting its scales, lossily): peftfast
    reads that new standard state, the oracle decodes it, they agree."""
    model = tiny_4bit_llama()
    x = inputs()
    _logits(model, x)
    model.state_dict()
    model = _patch(model, "lora", every_linear=True)
    assert rel_err(_logits(model, x), _logits(_oracle(model), x)) < TOL


# ------------------------------------------------------------------------------------------------------
# peftfast's own application: the models `peftfast train` / `generate` load keep their layout
# ------------------------------------------------------------------------------------------------------


def test_app_loaded_base_evaluates_in_fp32_and_keeps_its_layout():
    """load_base (train, generate, merge) on the embedded NF4 Llama: an eval pass leaves every 4-bit
    layer as loaded and gives the fp32 oracle's logits, where bitsandbytes would have repacked them and
    computed in bf16 (~3e-3 off)."""
    from peftfast.cli.basemodel import load_base

    model = load_base(None, load_in_4bit=True)["model"].eval()
    oracle = dense_twin(model).eval()
    before = {n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    x = {"input_ids": torch.randint(1, 250, (2, 11), generator=torch.Generator().manual_seed(0))}
    assert rel_err(_logits(model, x), _logits(oracle, x)) < TOL
    for n, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False), n
            assert torch.equal(m.weight.data, before[n]), n


def test_train_eval_loss_and_generate_are_the_fp32_numbers(tmp_path):
    """`peftfast train` with LoRA on q/v only (the other 4-bit layers are bitsandbytes'), then the saved
    adapter in `generate`'s loader: the reported held-out loss equals the fp32 oracle's on the same
    examples, and generation's logits are the oracle's."""
    from peftfast.cli.basemodel import load_base
    from peftfast.cli.data import collate, load_dataset, split
    from peftfast.cli.generate import load_with_adapter
    from peftfast.cli.train import DEFAULT_DATA, evaluate
    from peftfast.cli.train import main as train_main

    out = tmp_path / "run"
    res = train_main(["--max-steps", "3", "--seq-len", "32", "--batch-size", "4", "--logging-steps", "100",
                      "--target-modules", "q_proj,v_proj", "--output", str(out)])
    loaded = load_with_adapter(None, str(out), None)
    model = loaded["model"]
    oracle = _oracle(model)
    tok = load_base(None, load_in_4bit=False)["tokenizer"]
    _, eval_set = split(load_dataset(DEFAULT_DATA, tok, 32), 0.05, 0)
    want = evaluate(oracle, eval_set, 4, tok.pad_id, "cpu", False)
    assert abs(res["eval_loss"] - want) < TOL * want, (res["eval_loss"], want)
    assert abs(evaluate(model, eval_set, 4, tok.pad_id, "cpu", False) - want) < TOL * want
    batch = collate(eval_set[:1], tok.pad_id)
    x = {"input_ids": batch["input_ids"][:1, :8]}
    assert rel_err(_logits(model, x), _logits(oracle, x)) < TOL
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
