"""The coverage matrix: every (model family, method) against Hugging Face PEFT, and the README table.

For each cell of ``peftfast.devtools.coverage`` (families x LoRA, LoRA on a 4-bit base, IA3, prefix tuning,
prompt tuning) PEFT creates an adapter with random non-zero weights on a tiny random model and saves
it; peftfast loads it (trainable) into a copy of the same base. Both then give the same logits
(left-padded inputs), and the same losses and adapter weights over a few SGD steps. SGD keeps the
comparison honest where a gradient is float noise (AdamW would blow noise up into full-size steps);
float32 on the reference backend, where both sides do the same arithmetic up to reordering, so 1e-5
relative is ~100x float32 rounding and far below any real slip (a wrong layer, scaling or prefix
position moves logits by 1e-3 or more).

Cells:
* PEFT refuses (``coverage.PEFT_UNSUPPORTED``): the test checks PEFT still raises, so the table is
  corrected the day PEFT learns it;
* peftfast refuses (``coverage`` says "unsupported"): strict xfail with peftfast's reason, so a cell
  that starts working turns the run red until the table is regenerated;
* the rest must match PEFT, and the layers peftfast wraps must be those ``coverage`` names.

4-bit cells: PEFT runs on the fp32 twin of the 4-bit base (every ``Linear4bit`` replaced by an
``nn.Linear`` holding its independently decoded weight, tests/bnb_oracle.py), peftfast on the 4-bit base
itself. On CPU, PEFT on bitsandbytes is no oracle: bitsandbytes' eval forward repacks the weight and
computes in bf16 (~3e-3 off), crashes on these tiny layers (N not a multiple of 32, K below the
blocksize), and its CPU dequantize is wrong where blocks straddle rows. PEFT's LoRA on the exactly
decoded weights is what peftfast's number must be, to float32 rounding.
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import os

import pytest
import torch

peft = pytest.importorskip("peft")
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402

import peftfast  # noqa: E402
from peftfast.devtools import coverage  # noqa: E402
from peftfast.config import ConfigError  # noqa: E402
from peftfast.layers.base_weight import kernel_weight  # noqa: E402
from peftfast.layers import AdapterLayer  # noqa: E402
from peftfast.layers.conv_embedding import is_lora_extra  # noqa: E402

import prompt_oracle  # noqa: E402
from bnb_oracle import dense_twin  # noqa: E402
from helpers import assert_rel_close, rel_err  # noqa: E402
from models import matrix_inputs, matrix_model  # noqa: E402

TOL = 1e-5
# Parameter updates after STEPS steps: each step's gradient is taken at parameters that already differ
# by float32 rounding, so errors compound a little (measured: <= 1.5e-5 for Blip-2 on a 4-bit base).
UPDATE_TOL = 5e-5
STEPS = 3
LR = 0.1
PEFT_PREFIX = "base_model.model."
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
NEEDS_BNB = pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes (4-bit and 8-bit bases)")
METHODS = coverage.METHODS if HAS_BNB else tuple(m for m in coverage.METHODS if m != "lora-4bit")
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: threads only contend (10x slower on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=1)
def matrix() -> dict:
    return coverage.coverage_matrix(methods=METHODS)


def peft_config(family: str, method: str):
    kw = coverage.method_kwargs(family, method)
    if method in ("lora", "lora-4bit"):
        return peft.LoraConfig(init_lora_weights=False, **kw)
    if method == "ia3":
        return peft.IA3Config(init_ia3_weights=False, **kw)
    if method == "prefix":
        return peft.PrefixTuningConfig(**kw)
    return peft.PromptTuningConfig(**kw)


def _cells(peft_supported: bool):
    out = []
    for (family, method), cell in matrix().items():
        if ((family, method) in coverage.PEFT_UNSUPPORTED) == peft_supported:
            continue
        marks = ()
        if peft_supported and cell.reason is not None:
            marks = pytest.mark.xfail(strict=True, raises=ConfigError, reason=f"peftfast: {cell.reason}")
        out.append(pytest.param(family, method, marks=marks, id=f"{family}-{method}"))
    if not HAS_BNB:  # listed, not dropped: the report shows what this machine could not check
        out += [pytest.param(f, "lora-4bit", marks=NEEDS_BNB, id=f"{f}-lora-4bit") for f in coverage.FAMILIES
                if ((f, "lora-4bit") in coverage.PEFT_UNSUPPORTED) != peft_supported]
    return out


def _out(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    return out.logits


def _train(model, batches) -> list:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)
    model.train()
    losses = []
    for batch in batches:
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def _check_paths(fast, pm, cell, method) -> None:
    """coverage's per-layer answer is what patch did: same wrapped layers (as PEFT's), same kernel use."""
    if method in ("prefix", "prompt"):
        assert fast.peftfast_prompt_learning is not None
        return
    wrapped = {n: m for n, m in fast.named_modules() if isinstance(m, AdapterLayer)}
    assert set(wrapped) == set(cell.layers), "coverage.layer_paths names other layers than patch wrapped"
    peft_wrapped = {n[len(PEFT_PREFIX):] for n, m in pm.named_modules() if isinstance(m, BaseTunerLayer)}
    assert set(wrapped) == peft_wrapped, f"wrapped layers differ: only peftfast {sorted(set(wrapped) - peft_wrapped)[:4]}, " \
                                         f"only PEFT {sorted(peft_wrapped - set(wrapped))[:4]}"
    for name, layer in wrapped.items():
        want = coverage.REFERENCE if is_lora_extra(layer.base_layer) or kernel_weight(layer.base_layer) is None \
            else coverage.FUSED
        assert cell.layers[name] == want, name


@pytest.mark.parametrize("family,method", _cells(peft_supported=True))
def test_cell_matches_peft(family, method, tmp_path):
    base = matrix_model(family, method)
    oracle_base = dense_twin(base) if method == "lora-4bit" else base
    inputs = matrix_inputs(family)
    if method == "prefix" and coverage.FAMILIES[family].task in ("SEQ_CLS", "TOKEN_CLS") \
            and not prompt_oracle.peft_speaks_cache_kwarg(base):
        return _prefix_cell_against_the_hand_fed_oracle(family, base, inputs)
    pm = peft.get_peft_model(copy.deepcopy(oracle_base), peft_config(family, method))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".ia3_l." in name:  # PEFT's init_ia3_weights=False is N(1, 0.02): too close to a no-op to test
                p.normal_(1.0, 0.3)
            elif method in ("prefix", "prompt") and "prompt_encoder" not in name and ".modules_to_save." not in name:
                # PEFT freezes only the language model for prompt learning: Blip-2's query_tokens would
                # train, outside the adapter it saves. Compare the adapter (and its saved heads) alone.
                p.requires_grad_(False)
    pm.save_pretrained(str(tmp_path / "peft"))
    fast = peftfast.load_adapter(copy.deepcopy(base), str(tmp_path / "peft"), is_trainable=True)
    pm.eval(), fast.eval()
    _check_paths(fast, pm, matrix()[(family, method)], method)

    with torch.no_grad():
        ref, want, got = _out(oracle_base, inputs), _out(pm, inputs), _out(fast, inputs)
    assert got.shape == want.shape
    tail = want[:, -ref.shape[1]:] if want.shape != ref.shape else want  # prompt tuning adds virtual-token logits
    assert rel_err(tail, ref) > 10 * TOL, "the adapter changes nothing: the comparison would be vacuous"
    assert_rel_close(got, want, TOL, f"{family}/{method} logits")

    before = {k: v.detach().clone() for k, v in get_peft_model_state_dict(pm).items()}
    assert sorted(peftfast.adapter_state_dict(fast)) == sorted(before), "different adapter tensors"
    assert peftfast.trainable_parameters(fast)[0] == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    batches = [matrix_inputs(family, seed=10 + i) for i in range(STEPS)]
    peft_losses, fast_losses = _train(pm, batches), _train(fast, batches)
    for step, (a, b) in enumerate(zip(fast_losses, peft_losses)):
        assert abs(a - b) <= TOL * abs(b), f"step {step}: loss {a!r} (peftfast) vs {b!r} (PEFT)"
    assert peft_losses[-1] != peft_losses[0], "the loss did not move: nothing was trained"
    after_peft, after_fast = get_peft_model_state_dict(pm), peftfast.adapter_state_dict(fast)
    # Compare the updates; a tensor whose update is float noise (a gradient zero in exact arithmetic) is
    # held to the size of the whole update instead of its own.
    deltas = {k: after_peft[k].double() - before[k].double() for k in before}
    floor = 1e-3 * torch.cat([d.flatten() for d in deltas.values()]).norm().item()
    assert floor > 0, "no adapter tensor moved"
    for k, d in deltas.items():
        err = (after_fast[k].double() - before[k].double() - d).norm().item()
        # float32 storage: each step rounds the parameter to half an ulp, whatever the gradient's accuracy
        rounding = STEPS * torch.finfo(torch.float32).eps * after_peft[k].double().norm().item()
        assert err <= UPDATE_TOL * max(d.norm().item(), floor) + rounding, \
            f"update of {k}: error {err:.3e}, size {d.norm().item():.3e}"
    with torch.no_grad():
        got_after = _out(fast, inputs)
        if method != "lora-4bit":
            assert_rel_close(got_after, _out(pm, inputs), TOL, f"{family}/{method} logits after training")
        else:
            # On a 4-bit base the two sides train by different arithmetic (PEFT: a dense fp32 twin of the exactly
            # decoded weights; peftfast: the 4-bit decode inside its path), so their adapters part by up to
            # UPDATE_TOL (checked above) and the logits inherit that, by a factor that depends on the machine's
            # matmul order (7e-5 to 1.5e-4 for ViT). What must hold to TOL is the forward at the adapter
            # peftfast trained: PEFT's model given peftfast's adapter computes peftfast's logits.
            twin = copy.deepcopy(pm)
            loaded = set_peft_model_state_dict(twin, {k: v.detach().clone() for k, v in after_fast.items()})
            assert not loaded.unexpected_keys, loaded.unexpected_keys
            assert_rel_close(got_after, _out(twin, inputs), TOL, f"{family}/{method} logits at the trained adapter")


def _prefix_cell_against_the_hand_fed_oracle(family: str, base, inputs: dict) -> None:
    """Prefix tuning on a classification model once transformers (5.24) renamed the cache argument: PEFT
    passes ``past_key_values`` only and refuses these models. The oracle is then the unpatched base with the
    adapter's prefix fed by hand as a cache of P past tokens (tests/prompt_oracle.py); training is checked
    against that oracle in tests/test_prompt_learning.py. PEFT must still refuse: the day it does not, this
    cell goes back to the comparison against PEFT."""
    with pytest.raises(ValueError, match="past key values"), torch.no_grad():
        peft.get_peft_model(copy.deepcopy(base), peft_config(family, "prefix"))(**inputs)
    fast = peftfast.patch(copy.deepcopy(base), peftfast.PrefixTuningConfig(**coverage.method_kwargs(family, "prefix")))
    with torch.no_grad():
        for name, p in fast.named_parameters():
            if p.requires_grad and "modules_to_save" not in name:
                p.normal_(0.0, 0.5)
    fast.eval()
    _check_paths(fast, None, matrix()[(family, "prefix")], "prefix")
    state = fast.peftfast_prompt_learning
    cfg, prompt = state.configs["default"], state.encoders["default"].prompt_embeddings().detach()
    fed = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        ref, got = _out(base, fed), _out(fast, fed)
        want = prompt_oracle.prefix_forward(base, prompt, cfg.num_layers, cfg.num_attention_heads, **fed).logits
    assert rel_err(want, ref) > 10 * TOL, "the prefix changes nothing: the comparison would be vacuous"
    assert_rel_close(got, want, TOL, f"{family}/prefix logits against the hand-fed prefix")
    losses = _train(fast, [matrix_inputs(family, seed=10 + i) for i in range(STEPS)])
    assert losses[-1] != losses[0], "the loss did not move: nothing was trained"


@pytest.mark.parametrize("family,method", _cells(peft_supported=False))
def test_cell_unsupported_by_peft(family, method):
    """PEFT still refuses these (if it learns one, move the cell out of coverage.PEFT_UNSUPPORTED)."""
    base = matrix_model(family, method)
    inputs = matrix_inputs(family)
    with pytest.raises(Exception):
        pm = peft.get_peft_model(base, peft_config(family, method))
        pm(**inputs).loss.backward()


@NEEDS_BNB
def test_readme_table_is_generated():
    with open(README, encoding="utf-8") as f:
        block = coverage.readme_block(f.read())
    assert block is not None, f"README.md lacks the {coverage.README_START} ... {coverage.README_END} markers"
    table = coverage.markdown_table(matrix())
    if block != table:
        print(table)
    assert block == table, f"README.md's coverage table is stale: regenerate it with `{coverage.REGENERATE}`"


def test_peft_unsupported_names_real_cells():
    assert set(coverage.PEFT_UNSUPPORTED) <= set(matrix()), "PEFT_UNSUPPORTED names cells not in the matrix"


@NEEDS_BNB
def test_layer_paths_follow_the_dispatch_predicates():
    """Reference paths by design (embedding, convolution, 8-bit base), unsupported types, and refusal."""
    import bitsandbytes as bnb
    import torch.nn as nn

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.lin = nn.Linear(8, 8)
            self.conv = nn.Conv1d(8, 8, 3)
            self.grouped = nn.Conv1d(8, 8, 3, groups=2)
            self.conv2d = nn.Conv2d(8, 8, 3)
            self.int8 = bnb.nn.Linear8bitLt(8, 8, has_fp16_weights=False)
            self.norm = nn.LayerNorm(8)

    toy = Toy()
    cell = coverage.layer_paths(toy, peftfast.LoraConfig(target_modules=["emb", "lin", "conv", "int8"]))
    assert cell.layers == {"emb": "reference", "lin": "fused", "conv": "reference", "int8": "reference"}
    assert cell.path == "fused + reference" and cell.reason is None
    assert coverage.layer_paths(toy, peftfast.IA3Config(target_modules=["lin"], feedforward_modules=[])).path == "fused"
    assert coverage.layer_paths(toy, peftfast.LoraConfig(target_modules=["grouped"])).path == "reference"
    refused = coverage.layer_paths(toy, peftfast.LoraConfig(target_modules=["norm"]))
    assert refused.path == "unsupported" and "LayerNorm" in refused.reason
    assert coverage.layer_paths(toy, peftfast.IA3Config(target_modules=["emb"])).path == "unsupported"
    # IA3 wraps Conv2d/Conv3d (PyTorch ops), not Conv1d (PEFT has no IA3 for it either)
    assert coverage.layer_paths(toy, peftfast.IA3Config(target_modules=["conv2d"], feedforward_modules=[])).path == (
        "reference")
    assert coverage.layer_paths(toy, peftfast.IA3Config(target_modules=["conv"], feedforward_modules=[])).path == (
        "unsupported")
