"""``target_parameters``: LoRA on raw parameters (MoE expert stacks), against Hugging Face PEFT's ParamWrapper.

Models: tiny random Mixtral ([E, out, in] expert stacks, ``F.linear`` per expert) and gpt-oss ([E, in, out],
``x @ w``, ``is_transposed``), each under transformers' three experts implementations (``eager`` loop,
``batched_mm`` gather + bmm, ``grouped_mm``), plus a toy module whose 3-D parameter is used through an op the
lazy weight does not know (einsum: the materialized fallback) and a 2-D ``nn.Linear.weight``.

Tolerances: eager and batched_mm run in float64 on both sides, where only summation order differs (1e-10
relative is ~1e5 ulps of fp64 and ~1e-6 of any real mistake). grouped_mm has no float64 kernel, so it runs in
float32; PEFT adds the delta into the weight before the GEMM and peftfast adds the low-rank term after it,
which differ by a few fp32 roundings of the logits (measured ~3e-7 relative): 1e-5 is ~100x that.
bfloat16 cases (reference and Triton backends) are held to twice PEFT's own bf16 error against a float64
run of the same weights (see ``_bf16_bound``).
"""
from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft.utils import get_peft_model_state_dict  # noqa: E402

import peftfast  # noqa: E402
from peftfast.checkpoint import adapter_state_dict  # noqa: E402
from peftfast.config import ConfigError  # noqa: E402
from peftfast.layers.params import LoraParamWrapper, LoraWeight  # noqa: E402

from helpers import assert_rel_close  # noqa: E402

PREFIX = "base_model.model."
EXPERT_PARAMS = ["experts.gate_up_proj", "experts.down_proj"]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _tiny(family: str, dtype=torch.float64, impl: str = "eager", intermediate: int = 12):
    common = dict(vocab_size=61, hidden_size=16, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, num_local_experts=5, num_experts_per_tok=2, head_dim=8)
    torch.manual_seed(0)
    if family == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**common))
    else:
        model = transformers.GptOssForCausalLM(transformers.GptOssConfig(
            **common, layer_types=["full_attention", "sliding_attention"]))
        with torch.no_grad():  # gpt-oss initializes its expert biases to zero: make them count
            for name, p in model.named_parameters():
                if name.endswith("_bias"):
                    p.normal_(0, 0.1)
    model.config._experts_implementation = impl
    return model.to(dtype).eval()


def _ids(batch=3, seq=7):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 61, (batch, seq), generator=g)


def _peft_and_ours(base, config, backend="reference"):
    """PEFT's model and ours with the same (random, non-zero) adapter values."""
    theirs = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    ours = peftfast.patch(copy.deepcopy(base), config, backend=backend)
    sd = ours.state_dict()
    with torch.no_grad():
        for key, value in theirs.state_dict().items():
            if "lora_" in key:
                sd[key[len(PREFIX):]].copy_(value)
    return theirs, ours


def _config(**kw):
    kw.setdefault("target_modules", [])
    return peft.LoraConfig(r=3, lora_alpha=5, target_parameters=list(EXPERT_PARAMS), init_lora_weights=False, **kw)


def _grads(model, prefix=""):
    return {n[len(prefix):]: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
def test_logits_grads_counts_keys_match_peft(family, impl):
    dtype = torch.float32 if impl == "grouped_mm" else torch.float64
    base = _tiny(family, dtype, impl)
    theirs, ours = _peft_and_ours(base, _config())
    ids = _ids()
    # The routed-only path must answer every op these experts implementations use: no dense delta.
    with mock.patch.object(LoraWeight, "materialize", side_effect=AssertionError("materialized")):
        y_ours = ours(ids).logits
    y_theirs = theirs(ids).logits
    with torch.no_grad():
        y_base = base(ids).logits
    assert (y_theirs - y_base).abs().max() > 1e-3  # the adapter changes the output
    assert_rel_close(y_ours, y_theirs, TOL[dtype], f"{family}/{impl} logits")
    dy = torch.randn_like(y_ours)
    with mock.patch.object(LoraWeight, "materialize", side_effect=AssertionError("materialized")):
        (y_ours * dy).sum().backward()
    (y_theirs * dy).sum().backward()
    g_ours, g_theirs = _grads(ours), _grads(theirs, PREFIX)
    assert sorted(g_ours) == sorted(g_theirs) and len(g_ours) == 8
    for name in g_ours:
        assert_rel_close(g_ours[name], g_theirs[name], TOL[dtype] * 10, f"{family}/{impl} grad {name}")
    trainable, total = peftfast.trainable_parameters(ours)
    assert (trainable, total) == (sum(p.numel() for p in theirs.parameters() if p.requires_grad),
                                  sum(p.numel() for p in theirs.parameters()))
    assert sorted(adapter_state_dict(ours)) == sorted(get_peft_model_state_dict(theirs))
    layer = ours.model.layers[0].mlp.experts
    assert isinstance(layer, LoraParamWrapper) and layer.parameter_name == "down_proj"
    assert isinstance(layer.base_layer, LoraParamWrapper) and layer.base_layer.parameter_name == "gate_up_proj"


# --- bfloat16: within twice PEFT's own error, both measured against float64 on the same weights ----------

BF16 = torch.bfloat16


def _bf16_bound(truth: torch.Tensor, theirs: torch.Tensor) -> float:
    """flash-attention's rule in absolute RMS terms: twice PEFT's bf16 error plus the error of the truth
    rounded to bf16 (what even an exact computation with a bf16 result carries), both against float64.

    The floor is measured, not chosen: ``||round_bf16(truth) - truth||``, about ``eps_bf16 / 2`` relative
    at most (eps_bf16 = 2^-7). Without it, a result PEFT happened to get within less than a rounding could
    not be matched by any other bf16 order of operations.
    """
    t = truth.detach().double()
    floor = (t.to(BF16).double() - t).norm().item()
    return 2 * (theirs.detach().double() - t).norm().item() + floor


def _assert_bf16_close(ours, theirs, truth, what: str) -> None:
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    err = (ours.detach().double() - truth.detach().double()).norm().item()
    bound = _bf16_bound(truth, theirs)
    scale = truth.detach().double().norm().item()
    assert err <= bound, f"{what}: |ours - fp64| = {err / scale:.3e} relative > bound {bound / scale:.3e}"


def _bf16_models(family: str, impl: str, backend: str):
    """(PEFT bf16, peftfast bf16, PEFT float64 truth) with the same bf16 base weights and fp32 adapter values.

    intermediate_size 16: torch's CPU grouped_mm needs 16-byte strides, which 12 bf16 columns are not."""
    base = _tiny(family, BF16, impl, intermediate=16)
    theirs, ours = _peft_and_ours(base, _config(), backend=backend)
    truth = copy.deepcopy(theirs).double()  # exact upcast of the same values
    truth.base_model.model.config._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    return theirs, ours, truth


def _bf16_dy(shape) -> torch.Tensor:
    """An upstream gradient exact in bf16, so all three runs back-propagate the same values."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(BF16)


def _run_and_grads(model, run, prefix: str, dtype) -> tuple:
    model.zero_grad()
    y, leaves = run(model, dtype)
    (y * _bf16_dy(y.shape).to(y.dtype)).sum().backward()
    grads = {n: g for n, g in _grads(model, prefix).items() if g is not None}  # the layer run: layer 0's only
    grads.update({f"input {i}": t.grad for i, t in enumerate(leaves)})
    return y.detach(), grads


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_bf16_logits_and_grads_within_twice_peft_error(family, impl, backend):
    """Whole-model logits and every adapter gradient, then the first expert layer alone on the same bf16
    inputs (output, adapter and input gradients): there the LoRA term's arithmetic is most of the error.
    PEFT folds ``W + s lhs rhs`` into the bf16 weight; peftfast runs the base GEMM in bf16 and the routed
    low-rank term in fp32 (rounded once onto the output), so it must stay within the bound."""
    from peftfast.kernels import grouped_lora_triton

    theirs, ours, truth = _bf16_models(family, impl, backend)
    ids = _ids()
    prefix = {id(theirs): PREFIX, id(truth): PREFIX, id(ours): ""}

    def whole(model, dtype):
        return model(ids).logits, []

    captured = {}

    def grab(module, args, kwargs):
        captured.setdefault("call", (args, kwargs))

    def experts(model):
        return model.get_submodule(prefix[id(model)] + "model.layers.0.mlp.experts")

    hook = experts(truth).register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        truth(ids)
    hook.remove()

    def layer(model, dtype):
        args, kwargs = captured["call"]
        leaves = []

        def prepare(t):  # floating inputs rounded to bf16 once, so all three see the same values
            if not (torch.is_tensor(t) and t.is_floating_point()):
                return t
            leaf = t.detach().to(BF16).to(dtype).requires_grad_(True)
            leaves.append(leaf)
            return leaf

        out = experts(model)(*[prepare(a) for a in args], **{k: prepare(v) for k, v in kwargs.items()})
        return (out[0] if isinstance(out, tuple) else out), leaves

    spy = mock.patch.object(grouped_lora_triton, "triton_grouped_lora", wraps=grouped_lora_triton.triton_grouped_lora)
    for what, run in (("logits", whole), ("experts layer 0", layer)):
        want = _run_and_grads(truth, run, PREFIX, torch.float64)
        peft_bf16 = _run_and_grads(theirs, run, PREFIX, BF16)
        with spy as calls:
            got = _run_and_grads(ours, run, "", BF16)
        # the grouped term runs for batched_mm / grouped_mm (eager loops take F.linear), on the asked backend
        uses_grouped = impl != "eager"
        assert calls.called == (uses_grouped and backend == "triton"), (what, calls.call_count)
        assert got[0].dtype == BF16 and peft_bf16[0].dtype == BF16
        assert (peft_bf16[0].double() - want[0]).abs().max() > 0, "bf16 run is exact: vacuous test"
        _assert_bf16_close(got[0], peft_bf16[0], want[0], f"{family}/{impl}/{backend} {what} output")
        assert sorted(got[1]) == sorted(want[1])
        assert sum(not n.startswith("input") for n in got[1]) == (8 if what == "logits" else 4)  # 2 stacks x A, B
        for name in want[1]:
            _assert_bf16_close(got[1][name], peft_bf16[1][name], want[1][name], f"{family}/{impl}/{backend} {what} "
                               f"grad {name}")


# --- torch.compile of the whole model ---------------------------------------------------------------------


def _explain(model, ids):
    torch._dynamo.reset()
    return torch._dynamo.explain(model)(ids)


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("impl", ["batched_mm", "grouped_mm"])
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_whole_model_compiles_without_graph_breaks(family, impl, backend):
    """The lazy weight's ops trace (dynamo inlines ``LoraWeight.__torch_function__``; grouped_mm is told by
    identity, not by name), the grouped term is one custom-op node (Triton) or the reference's masked form:
    the adapted model is one graph, as the bare model is. Compiled with backend="eager", its logits and every
    adapter gradient equal the eager model's (bit for bit with Triton: the same bodies; the reference's masked
    form may round differently, within a few fp32 ulps), and further training steps do not recompile."""
    base = _tiny(family, torch.float32, impl)
    assert _explain(base, _ids()).graph_break_count == 0  # the bare model: one graph, nothing to blame on it
    _, ours = _peft_and_ours(base, _config(), backend=backend)
    ids = _ids()
    explained = _explain(ours, ids)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons

    results = []
    for model in (ours, torch.compile(ours, backend="eager")):
        ours.zero_grad()
        y = model(ids).logits
        y.square().mean().backward()
        results.append((y.detach(), _grads(ours)))
    (want, want_grads), (got, got_grads) = results

    def same(a, b, what):
        if backend == "triton":
            assert torch.equal(a, b), f"{what}: compiled != eager"
        else:  # 1e-6 relative: ~8 fp32 ulps (measured <= 6e-8)
            assert_rel_close(a, b, 1e-6, what)

    same(got, want, "compiled logits")
    assert sorted(got_grads) == sorted(want_grads) and len(want_grads) == 8
    for name in want_grads:
        same(got_grads[name], want_grads[name], f"compiled grad {name}")

    compiled = torch.compile(ours, backend="eager")
    compiled(ids)  # compiles once for this wrapper object
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    torch.compiler.set_stance("fail_on_recompile")
    try:
        for _ in range(2):
            compiled(ids).logits.square().mean().backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.compiler.set_stance("default")


def test_a_lora_weight_left_by_a_failed_traced_forward_is_ignored():
    """Traced, the wrapper drops its try/finally (dynamo cannot resume a graph break inside one), so a compiled
    forward that raises may leave the LoraWeight in the owner's __dict__. Nothing may read it afterwards:
    get_param returns the registered parameter, a disabled forward is the base model, merge adds one delta."""
    base = _tiny("mixtral")
    _, ours = _peft_and_ours(base, _config())
    ids = _ids()
    adapted = ours(ids).logits.detach()
    wrapper = ours.model.layers[0].mlp.experts
    owner = wrapper.base_layer.base_layer
    param = owner._parameters["down_proj"]
    owner.__dict__["down_proj"] = LoraWeight(param, [])  # what an interrupted traced forward leaves
    assert wrapper.get_param() is param
    with peftfast.disable_adapters(ours):
        assert_rel_close(ours(ids).logits, base(ids).logits, 1e-12, "disabled after a stale attribute")
    assert "down_proj" not in owner.__dict__
    owner.__dict__["down_proj"] = LoraWeight(param, [])
    assert_rel_close(ours(ids).logits, adapted, 1e-12, "adapted after a stale attribute")
    assert "down_proj" not in owner.__dict__
    peftfast.merge(ours)
    assert_rel_close(ours(ids).logits, adapted, 1e-10, "merged")


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_eager_experts_loop_breaks_only_in_transformers():
    """transformers' eager experts loop breaks the graph itself (``nonzero``: data-dependent shapes), in
    the bare model too. Each such break also splits the frames around it, so the two nested wrappers add
    graphs, but no break arises in peftfast's own code."""
    base = _tiny("mixtral", torch.float32, "eager")
    bare = _explain(base, _ids())
    _, ours = _peft_and_ours(base, _config())
    explained = _explain(ours, _ids())
    assert bare.graph_break_count > 0 and explained.break_reasons
    ours_code = ("/peftfast/", "/kernels/")
    for reason in explained.break_reasons:
        innermost = reason.user_stack[-1].filename
        assert not any(part in innermost for part in ours_code), (innermost, reason.reason)
        assert "nonzero" in str(reason.reason), reason.reason
    compiled = torch.compile(ours, backend="eager")
    assert torch.equal(compiled(_ids()).logits, ours(_ids()).logits)


def test_batched_and_grouped_use_the_grouped_kernel_entry():
    base = _tiny("mixtral", torch.float32, "grouped_mm")
    _, ours = _peft_and_ours(base, _config())
    from peftfast.layers import params as lora_params

    with mock.patch.object(lora_params, "grouped_lora", wraps=lora_params.grouped_lora) as spy:
        ours(_ids())
    assert spy.call_count == 4  # two layers x two expert stacks, one grouped call each


@pytest.mark.filterwarnings("ignore:The following rank_pattern keys")  # PEFT checks modules only; it applies it
def test_toy_module_fallback_and_2d_parameter():
    """A 3-D parameter used through einsum (not one of the lazy ops: materialized, PEFT's semantics) and an
    nn.Linear's 2-D weight (F.linear, lazy), with rank_pattern keyed by the parameter's name."""

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 9, 5))
            self.unused = nn.Parameter(torch.randn(3))

        def forward(self, h):
            return torch.einsum("bi,eio->beo", h, self.w).sum(1)

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(7, 9)
            self.stack = Stack()

        def forward(self, x):
            return self.stack(self.lin(x))

    torch.manual_seed(3)
    base = Toy().double()
    cfg = peft.LoraConfig(r=2, lora_alpha=3, target_modules=[], target_parameters=["lin.weight", "stack.w"],
                          rank_pattern={"lin.weight": 4}, init_lora_weights=False)
    theirs, ours = _peft_and_ours(base, cfg)
    assert ours.lin.lora_A["default"].weight.shape == (4, 7)
    x = torch.randn(6, 7, dtype=torch.float64)
    assert_rel_close(ours(x), theirs(x), 1e-10, "toy")
    with pytest.raises(AttributeError, match="without LoRA"):
        ours.stack.w  # read from outside the owner's forward, it would silently be the base weight
    assert sorted(adapter_state_dict(ours)) == sorted(get_peft_model_state_dict(theirs))


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_save_and_load_both_ways(family, tmp_path):
    base = _tiny(family)
    theirs, ours = _peft_and_ours(base, _config())
    ids = _ids()
    want = theirs(ids).logits
    peftfast.save_adapter(ours, str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    loaded_by_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    assert_rel_close(loaded_by_peft(ids).logits, want, TOL[torch.float64], "peftfast file -> peft")
    loaded_by_us = peftfast.load_adapter(copy.deepcopy(base), str(tmp_path / "theirs"))
    assert_rel_close(loaded_by_us(ids).logits, want, TOL[torch.float64], "peft file -> peftfast")
    assert peftfast.trainable_parameters(loaded_by_us)[0] == 0  # loaded for inference


def test_training_steps_match_peft():
    base = _tiny("mixtral", torch.float64, "batched_mm")
    theirs, ours = _peft_and_ours(base, _config())
    ids = _ids()
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (theirs, ours)]
    for _ in range(3):
        for model, opt in zip((theirs, ours), opts):
            opt.zero_grad()
            model(ids, labels=ids).loss.backward()
            opt.step()
    assert_rel_close(ours(ids).logits, theirs(ids).logits, 1e-9, "after 3 SGD steps")


def test_merge_unmerge_unpatch():
    base = _tiny("gpt_oss", torch.float64, "eager")
    theirs, ours = _peft_and_ours(base, _config())
    ids = _ids()
    adapted = ours(ids).logits.detach()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    peftfast.merge(ours)
    w = ours.model.layers[0].mlp.experts.get_param()
    assert not torch.equal(w, before["model.layers.0.mlp.experts.down_proj"])
    assert_rel_close(ours(ids).logits, adapted, 1e-10, "merged")
    with peftfast.disable_adapters(ours):
        assert_rel_close(ours(ids).logits, base(ids).logits, 1e-10, "disabled (unmerges)")
    peftfast.merge(ours)
    peftfast.unmerge(ours)
    assert_rel_close(ours(ids).logits, adapted, 1e-10, "unmerged")
    merged_theirs = theirs.merge_and_unload()
    peftfast.unpatch(ours, merge_adapters=True)
    assert type(ours.model.layers[0].mlp.experts).__name__ == "GptOssExperts"
    for key, value in merged_theirs.state_dict().items():
        assert_rel_close(ours.state_dict()[key], value, 1e-12, key)
    # unpatch without merging gives the base back exactly
    _, again = _peft_and_ours(base, _config())
    peftfast.merge(again, keep_original=True)
    peftfast.unpatch(again)
    assert sorted(again.state_dict()) == sorted(before)
    for key, value in again.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_two_adapters_switch_like_peft():
    base = _tiny("mixtral")
    theirs, ours = _peft_and_ours(base, _config())
    second = _config()
    theirs.add_adapter("b", copy.deepcopy(second))
    peftfast.patch(ours, second, adapter_name="b")
    sd = ours.state_dict()
    with torch.no_grad():
        for key, value in theirs.state_dict().items():
            if ".b." in key and "lora_" in key:
                sd[key[len(PREFIX):]].copy_(value)
    theirs.set_adapter("b")
    peftfast.set_adapter(ours, "b")
    ids = _ids()
    assert_rel_close(ours(ids).logits, theirs(ids).logits, 1e-10, "adapter b")
    assert peftfast.trainable_parameters(ours)[0] == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    other = peft.LoraConfig(r=2, target_modules=[], target_parameters=["experts.down_proj"])
    with pytest.raises(ConfigError, match="same parameters"):
        peftfast.patch(ours, other, adapter_name="c")


def test_with_target_modules_and_bias_all():
    base = _tiny("gpt_oss")
    cfg = _config(target_modules=["q_proj", "v_proj"], bias="all")
    theirs, ours = _peft_and_ours(base, cfg)
    ids = _ids()
    assert_rel_close(ours(ids).logits, theirs(ids).logits, 1e-10, "modules + parameters")
    names_ours = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    names_theirs = sorted(n[len(PREFIX):] for n, p in theirs.named_parameters() if p.requires_grad)
    assert names_ours == names_theirs  # bias="all" trains q_proj.bias, not the experts' gate_up_proj_bias
    assert sorted(adapter_state_dict(ours)) == sorted(get_peft_model_state_dict(theirs))


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [(n, type(m)) for n, m in model.named_modules()],
            {n: p.requires_grad for n, p in model.named_parameters()})


@pytest.mark.parametrize("bad, match", [
    (dict(lora_dropout=0.1), "lora_dropout"),
    (dict(use_dora=True), "use_dora"),
    (dict(target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "q_proj.weight"]),
     "target_modules also"),
    (dict(target_parameters=["experts.nothing_here"]), "matched no parameter"),
])
def test_refusals_leave_the_model_as_it_was(bad, match):
    model = _tiny("mixtral")
    before = _snapshot(model)
    kw = dict(r=2, target_modules=[], target_parameters=list(EXPERT_PARAMS))
    kw.update(bad)
    with pytest.raises(ConfigError, match=match):
        peftfast.patch(model, peftfast.LoraConfig(**kw))
    after = _snapshot(model)
    assert after[1] == before[1] and after[2] == before[2]
    assert all(torch.equal(after[0][k], v) for k, v in before[0].items())


def test_config_errors():
    with pytest.raises(ConfigError, match="target_parameters"):
        peftfast.LoraConfig(target_parameters="experts.gate_up_proj").validate()
    cfg = peftfast.LoraConfig(r=2, target_parameters=["experts.down_proj"])
    assert peftfast.config.as_config(cfg.to_dict()).target_parameters == ["experts.down_proj"]
