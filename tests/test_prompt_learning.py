"""Prefix tuning and prompt tuning against Hugging Face PEFT.

Same base weights + same prefix/prompt parameters => same logits (left-padded batches), same greedy
generations (KV cache), same training losses and final parameters, and checkpoints that load both ways.
Float32 on the reference backend: both sides run the same attention on the same concatenated K/V, so
1e-5 relative is ~100x their possible float32 reordering and far below any semantic slip (a shifted
position, a masked prefix or a dropped pad mask moves logits by 1e-2 or more).
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

peft = pytest.importorskip("peft")
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import peftfast  # noqa: E402
from peftfast.config import ConfigError  # noqa: E402

from helpers import assert_rel_close  # noqa: E402
from models import make_inputs, make_model, without_labels  # noqa: E402
import prompt_oracle as oracle  # noqa: E402
from tiny import assert_unchanged, snapshot  # noqa: E402

TOL = 1e-5
FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "opt"]
P = 5
NEW_TOKENS = 6


def peft_config(method: str, **kw):
    if method == "prefix":
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, **kw)
    return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, **kw)


def twins(family: str, method: str, **kw):
    """(PEFT model, peftfast model) on identical bases, with identical random (non-zero) prompt params."""
    base = make_model(family)
    pm = peft.get_peft_model(copy.deepcopy(base), peft_config(method, **kw))
    with torch.no_grad():
        for p in pm.prompt_encoder["default"].parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    ours = copy.deepcopy(base)
    peftfast.patch(ours, peft_config(method, **kw))
    encoder = ours.peftfast_prompt_learning.encoders["default"]
    encoder.load_state_dict(pm.prompt_encoder["default"].state_dict())
    return pm, ours


def train_in_lockstep(pm, ours, inputs: dict, steps: int) -> None:
    """AdamW steps on the PEFT model and on ours with the same batch; every loss must agree."""
    train_models_in_lockstep([ours, pm], inputs, steps)


def train_models_in_lockstep(models: list, inputs: dict, steps: int) -> None:
    """AdamW steps on every model with the same batch; each loss must agree with the first model's."""
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in models]
    for _ in range(steps):
        losses = [m(**inputs).loss for m in models]
        for i, loss in enumerate(losses[1:], 1):
            assert_rel_close(losses[0].detach(), loss.detach(), TOL, f"loss of {type(models[i]).__name__}")
        for opt, loss in zip(optimizers, losses):
            opt.zero_grad()
            loss.backward()
            opt.step()


def prompt_embeddings(model) -> torch.Tensor:
    """What the active adapter feeds the model: [P, 2L * Hkv * D] (prefix) or [P, hidden] (prompt)."""
    return model.peftfast_prompt_learning.encoders["default"].prompt_embeddings().detach()


def oracle_forward(base, ours, inputs: dict, method: str):
    """The unpatched ``base`` with ``ours``' prefix/prompt fed by hand (tests/prompt_oracle.py)."""
    if method == "prefix":
        cfg = ours.peftfast_prompt_learning.configs["default"]
        return oracle.prefix_forward(base, prompt_embeddings(ours), cfg.num_layers, cfg.num_attention_heads, **inputs)
    return oracle.prompt_forward(base, prompt_embeddings(ours), **inputs)


def oracle_greedy(base, ours, inputs: dict, method: str, new_tokens: int = NEW_TOKENS) -> tuple:
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if method == "prefix":
        cfg = ours.peftfast_prompt_learning.configs["default"]
        return oracle.prefix_greedy(base, prompt_embeddings(ours), cfg.num_layers, cfg.num_attention_heads, ids, mask,
                                    new_tokens)
    return oracle.prompt_greedy(base, prompt_embeddings(ours), ids, mask, new_tokens)


def assert_generation_matches(ours, pm, base, inputs: dict, method: str, new_tokens: int = NEW_TOKENS) -> None:
    """Greedy generate() (KV cache) against the uncached oracle: same tokens, same logits at every step; and
    against PEFT's generate() where PEFT can pass this transformers' model a cache (before 5.24: PEFT 0.21
    hands ``past_key_values`` to a forward that takes ``cache``, and its generate() looks for it in vain)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    got, got_logits = oracle.generate_with_logits(ours, ids, mask, new_tokens)
    expected, expected_logits = oracle_greedy(base, ours, inputs, method, new_tokens)
    assert_rel_close(got_logits, expected_logits, TOL, "logits of every generated token")
    assert torch.equal(got, expected)
    if oracle.peft_speaks_cache_kwarg(base):
        assert torch.equal(got, oracle.generate_with_logits(pm, ids, mask, new_tokens)[0])


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_generation_match_peft(family, method):
    pm, ours = twins(family, method)
    base = make_model(family)
    inputs = without_labels(make_inputs(family, batch=3, seq=9))
    with torch.no_grad():
        expected, got = pm(**inputs).logits, ours(**inputs).logits
        by_hand = oracle_forward(base, ours, inputs, method).logits
        base_logits = base(**inputs).logits
    assert got.shape == expected.shape
    assert_rel_close(got, expected, TOL, f"{family}/{method} logits")
    assert_rel_close(got, by_hand, TOL, f"{family}/{method} logits against the hand-fed base model")
    real = got[:, -base_logits.shape[1]:]  # prompt tuning also returns logits for the virtual tokens
    assert (real - base_logits).abs().max() > 1e-2, "the prefix/prompt changed nothing: the test would be vacuous"
    assert_generation_matches(ours, pm, base, inputs, method)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_prefix_cache_is_found_under_either_name(name):
    """A cache handed back continues the sequence under either argument name (transformers 5.24 renamed
    ``past_key_values`` to ``cache`` and still takes both): one cached step equals the uncached forward."""
    _, ours = twins("llama", "prefix")
    inputs = without_labels(make_inputs("llama", batch=2, seq=7))
    nxt = torch.randint(1, 90, (2, 1), generator=torch.Generator().manual_seed(3))
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
    with torch.no_grad():
        full = ours(input_ids=torch.cat([inputs["input_ids"], nxt], dim=1), attention_mask=mask).logits[:, -1]
        out = ours(**inputs, use_cache=True)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        step = ours(input_ids=nxt, attention_mask=mask, **{name: cache}).logits[:, -1]
    assert_rel_close(step, full, TOL, f"one step with the cache passed as {name}")
    from transformers import DynamicCache

    foreign = DynamicCache()
    foreign.update(torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 16), 0)
    with pytest.raises(ValueError, match=f"{name} holds tokens computed without the prefix"):
        ours(input_ids=nxt, attention_mask=mask, **{name: foreign})


def test_generation_oracle_sees_a_dropped_prompt():
    """The generation check is not vacuous: a model that stops applying its prompt after the first generated
    token (one way a hook that misses the cache argument goes wrong) fails it."""
    pm, ours = twins("llama", "prompt")
    base = make_model("llama")
    inputs = without_labels(make_inputs("llama", batch=3, seq=9))

    def first_step_only(module, args, kwargs):  # runs before peftfast's hook: later steps see no prompt
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and cache.get_seq_length() > 0:
            ours.peftfast_prompt_learning.disabled = True
        return None

    handle = ours.register_forward_pre_hook(first_step_only, with_kwargs=True, prepend=True)
    try:
        with pytest.raises(AssertionError, match="logits of every generated token"):
            assert_generation_matches(ours, pm, base, inputs, "prompt")
    finally:
        handle.remove()
        ours.peftfast_prompt_learning.disabled = False


@pytest.mark.parametrize("method,kw", [("prefix", {}), ("prefix", {"prefix_projection": True, "encoder_hidden_size": 12}),
                                       ("prompt", {})])
def test_training_matches_peft(method, kw):
    pm, ours = twins("llama", method, **kw)
    inputs = make_inputs("llama", batch=2, seq=8)
    assert peftfast.trainable_parameters(ours)[0] == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    train_in_lockstep(pm, ours, inputs, steps=3)
    theirs = dict(pm.prompt_encoder["default"].named_parameters())
    for name, p in ours.peftfast_prompt_learning.encoders["default"].named_parameters():
        assert_rel_close(p.detach(), theirs[name].detach(), TOL, name)


@pytest.mark.parametrize("reentrant", [False, True])
def test_prefix_with_gradient_checkpointing(reentrant):
    """PEFT refuses gradient checkpointing with prefix tuning; here the prefix travels as an argument,
    so checkpointed layers recompute with it and gradients are unchanged."""
    _, plain = twins("llama", "prefix")
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:  # reentrant checkpointing needs an input that requires grad to build the graph
        checkpointed.enable_input_require_grads()
    plain.train()
    checkpointed.train()
    inputs = make_inputs("llama", batch=2, seq=8)
    losses = []
    for model in (plain, checkpointed):
        loss = model(**inputs).loss
        loss.backward()
        losses.append(loss.detach())
    assert_rel_close(losses[1], losses[0], TOL, "loss")
    g0 = plain.peftfast_prompt_learning.encoders["default"].embedding.weight.grad
    g1 = checkpointed.peftfast_prompt_learning.encoders["default"].embedding.weight.grad
    assert g0 is not None and g0.abs().sum() > 0
    assert_rel_close(g1, g0, TOL, "prefix gradient")


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_saved_adapter_loads_in_peft_and_back(tmp_path, method):
    kw = {"prefix_projection": True, "encoder_hidden_size": 12} if method == "prefix" else {}
    pm, ours = twins("gpt2", method, **kw)
    inputs = without_labels(make_inputs("gpt2"))
    peftfast.save_adapter(ours, tmp_path / "ours")
    tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    pm.save_pretrained(tmp_path / "peft")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert tensors.keys() == theirs.keys() == {"prompt_embeddings"}
    assert_rel_close(tensors["prompt_embeddings"], theirs["prompt_embeddings"], TOL, "saved prompt_embeddings")
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key in ("num_virtual_tokens", "num_layers", "token_dim", "num_attention_heads", "num_transformer_submodules",
                "peft_type", "task_type"):
        assert ours_cfg[key] == peft_cfg[key], key
    with torch.no_grad():
        expected = pm(**inputs).logits
        from_ours = peft.PeftModel.from_pretrained(make_model("gpt2"), tmp_path / "ours")(**inputs).logits
        from_peft = peftfast.load_adapter(make_model("gpt2"), tmp_path / "peft")(**inputs).logits
    assert_rel_close(from_ours, expected, TOL, "PEFT loading peftfast's adapter")
    assert_rel_close(from_peft, expected, TOL, "peftfast loading PEFT's adapter")


def test_loaded_prefix_trains_when_asked(tmp_path):
    pm, _ = twins("llama", "prefix", prefix_projection=True, encoder_hidden_size=12)
    pm.save_pretrained(tmp_path)
    frozen = peftfast.load_adapter(make_model("llama"), tmp_path)
    assert peftfast.trainable_parameters(frozen)[0] == 0
    model = peftfast.load_adapter(make_model("llama"), tmp_path, is_trainable=True)
    weight = model.peftfast_prompt_learning.encoders["default"].embedding.weight
    assert weight.requires_grad
    model(**make_inputs("llama")).loss.backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_disable_and_unpatch_restore_the_base():
    base = make_model("llama")
    snap = snapshot(base)
    inputs = without_labels(make_inputs("llama"))
    with torch.no_grad():
        expected = base(**inputs).logits
    _, model = twins("llama", "prefix")
    model.load_state_dict(base.state_dict(), strict=False)
    with peftfast.disable_adapters(model), torch.no_grad():
        assert_rel_close(model(**inputs).logits, expected, TOL, "disabled")
    peftfast.unpatch(model)
    assert_unchanged(model, snap)
    assert model.config._attn_implementation == base.config._attn_implementation
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)


def test_bad_prompt_learning_input_leaves_model_unchanged():
    model = make_model("t5")
    snap = snapshot(model)
    with pytest.raises(ConfigError, match="encoder-decoder"):
        peftfast.patch(model, peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    assert_unchanged(model, snap)
    model = make_model("llama")
    model.config._attn_implementation_internal = "flex_attention"
    snap = snapshot(model)
    with pytest.raises(ConfigError, match="attn_implementation='sdpa'"):
        peftfast.patch(model, peft_config("prefix"))
    assert_unchanged(model, snap)
    assert model.config._attn_implementation == "flex_attention"
    model = make_model("llama")
    peftfast.patch(model, peft_config("prompt"))
    with pytest.raises(ConfigError, match="PromptTuningConfig"):
        peftfast.patch(model, peft_config("prefix"), adapter_name="other")
    assert sorted(model.peftfast_prompt_learning.encoders) == ["default"]


def test_wrong_prefix_shape_is_refused(tmp_path):
    pm, _ = twins("llama", "prefix")
    pm.save_pretrained(tmp_path)
    other = make_model("gpt2")
    snap = snapshot(other)
    with pytest.raises(ConfigError, match=r"made for another model: token_dim=16 \(the model needs 32\)"):
        peftfast.load_adapter(other, tmp_path)
    assert_unchanged(other, snap)


def test_two_prompt_adapters_switch(tmp_path):
    pm, ours = twins("llama", "prompt")
    pm.save_pretrained(tmp_path)
    peftfast.patch(ours, peft_config("prompt"), adapter_name="second")
    inputs = without_labels(make_inputs("llama"))
    with torch.no_grad():
        first = ours(**inputs).logits
        assert_rel_close(first, pm(**inputs).logits, TOL, "first adapter active")
        peftfast.set_adapter(ours, "second")
        second = ours(**inputs).logits
    assert (first - second).abs().max() > 1e-3
    with pytest.raises(ValueError, match="one at a time"):
        peftfast.set_adapter(ours, ["default", "second"])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefix_runs_on_the_fused_kernel(family, monkeypatch):
    """backend='triton' (Triton's interpreter here, CUDA on a GPU): the model's attention goes through
    kernels.prefix_attention, never concatenating the prefix, and matches the reference path in logits,
    prefix gradients and greedy generation (fp32: 1e-5 is ~100x the kernel's measured error)."""
    import importlib

    module = importlib.import_module("peftfast.kernels.prefix_attention")
    calls = []
    real = module.prefix_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    import peftfast.kernels as kernels

    monkeypatch.setattr(kernels, "prefix_attention", counting)
    _, reference = twins(family, "prefix")
    fused = copy.deepcopy(reference)
    fused.peftfast_prompt_learning.backend = "triton"
    inputs = make_inputs(family, batch=2, seq=9)
    losses, grads = [], []
    for model in (reference, fused):
        out = model(**inputs)
        out.loss.backward()
        losses.append(out.logits.detach())
        grads.append(model.peftfast_prompt_learning.encoders["default"].embedding.weight.grad)
    assert calls and set(calls) == {"triton"}, "the fused path was not taken"
    assert_rel_close(losses[1], losses[0], TOL, "logits")
    assert_rel_close(grads[1], grads[0], TOL, "prefix gradient")
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(fused.generate(**without_labels(inputs), **gen),
                           reference.generate(**without_labels(inputs), **gen))


# --------------------------------------------------------------------------------------------------
# Classification (SEQ_CLS): the head trains too (modules_to_save) and is saved next to the prompt
# --------------------------------------------------------------------------------------------------


def cls_twins(family: str, method: str, **kw):
    """(PEFT model, peftfast model) for SEQ_CLS with identical random prompts and classification heads."""
    cls = peft.PrefixTuningConfig if method == "prefix" else peft.PromptTuningConfig
    base = make_model(family)
    pm = peft.get_peft_model(copy.deepcopy(base), cls(task_type="SEQ_CLS", num_virtual_tokens=P, **kw))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.5)
    ours = copy.deepcopy(base)
    peftfast.patch(ours, cls(task_type="SEQ_CLS", num_virtual_tokens=P, **kw))
    ours.peftfast_prompt_learning.encoders["default"].load_state_dict(pm.prompt_encoder["default"].state_dict())
    head = "classifier" if hasattr(base, "classifier") else "score"
    theirs = pm.base_model.get_submodule(head).modules_to_save["default"]
    ours.get_submodule(head).modules_to_save["default"].load_state_dict(theirs.state_dict())
    return pm, ours


def cls_head_name(model) -> str:
    return "classifier" if hasattr(model, "classifier") else "score"


class HandFedClassifier(torch.nn.Module):
    """The oracle of classification prompt learning, trainable: an unpatched base whose head is the only
    trainable module, plus the prompt (what the adapter feeds the model) as a plain parameter fed by hand
    (tests/prompt_oracle.py). With a prefix encoder without projection, or prompt tuning, that parameter is
    the adapter's own, so AdamW moves both identically."""

    def __init__(self, family: str, method: str, prompt: torch.Tensor, head_state: dict, num_layers: int,
                 kv_heads: int):
        super().__init__()
        self.base = make_model(family)
        self.base.requires_grad_(False)
        head = self.base.get_submodule(cls_head_name(self.base))
        head.load_state_dict(head_state)
        head.requires_grad_(True)
        self.prompt = torch.nn.Parameter(prompt.detach().clone())
        self.method, self.num_layers, self.kv_heads = method, num_layers, kv_heads

    @classmethod
    def like(cls, family: str, method: str, ours) -> "HandFedClassifier":
        cfg = ours.peftfast_prompt_learning.configs["default"]
        head = ours.get_submodule(cls_head_name(ours)).modules_to_save["default"]
        return cls(family, method, prompt_embeddings(ours), head.state_dict(), cfg.num_layers, cfg.num_attention_heads)

    def forward(self, **inputs):
        if self.method == "prefix":
            return oracle.prefix_forward(self.base, self.prompt, self.num_layers, self.kv_heads, **inputs)
        return oracle.prompt_forward(self.base, self.prompt, **inputs)

    def adapter_tensors(self) -> dict:
        """This oracle's state under PEFT's checkpoint keys."""
        name = cls_head_name(self.base)
        head = {f"base_model.{name}.{k}": v for k, v in self.base.get_submodule(name).state_dict().items()}
        return {"prompt_embeddings": self.prompt.detach(), **head}


def peft_runs_cls(method: str, family: str) -> bool:
    """Whether PEFT's classification forward runs here: PEFT 0.21 refuses prefix tuning on a model whose
    forward takes the cache as ``cache`` (transformers 5.24+: "Model does not support past key values")."""
    return method != "prefix" or oracle.peft_speaks_cache_kwarg(make_model(family))


def _cls_inputs(family: str, token_types: bool) -> dict:
    inputs = make_inputs(family, batch=3, seq=8)
    if token_types:  # BERT keeps token types with prompt learning; PEFT gives the virtual tokens type 0
        inputs["token_type_ids"] = (torch.arange(8) >= 5).long().expand(3, -1).clone()
    return inputs


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("family", ["bert_cls", "llama_cls"])
def test_classification_matches_peft(family, method):
    """Logits, 3 AdamW steps and the saved tensors against the hand-fed oracle, and against PEFT where PEFT
    runs this case (see peft_runs_cls)."""
    pm, ours = cls_twins(family, method)
    hand = HandFedClassifier.like(family, method, ours)
    with_peft = peft_runs_cls(method, family)
    inputs = _cls_inputs(family, token_types=family == "bert_cls")
    trainable = peftfast.trainable_parameters(ours)[0]
    assert trainable == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in hand.parameters() if p.requires_grad)
    with torch.no_grad():
        got = ours(**without_labels(inputs)).logits
        assert_rel_close(got, hand(**without_labels(inputs)).logits, TOL, f"{family}/{method} logits, hand-fed")
        plain = make_model(family)
        name = cls_head_name(plain)
        plain.get_submodule(name).load_state_dict(hand.base.get_submodule(name).state_dict())
        assert (got - plain(**without_labels(inputs)).logits).abs().max() > 1e-2, "the prompt changed nothing"
        if with_peft:
            assert_rel_close(got, pm(**without_labels(inputs)).logits, TOL, f"{family}/{method} logits, PEFT")
    train_models_in_lockstep([ours, hand] + ([pm] if with_peft else []), inputs, steps=3)
    theirs = get_peft_model_state_dict(pm)
    mine = peftfast.adapter_state_dict(ours)
    assert sorted(mine) == sorted(theirs)
    by_hand = hand.adapter_tensors()
    for key in mine:
        assert_rel_close(mine[key], by_hand[key], TOL, f"{key} after training, hand-fed")
        if with_peft:
            assert_rel_close(mine[key], theirs[key], TOL, f"{key} after training, PEFT")


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_classification_adapter_round_trip(tmp_path, method):
    """peftfast's checkpoint = PEFT's (prompt_embeddings + base_model.classifier.*), loadable both ways."""
    kw = {"prefix_projection": True, "encoder_hidden_size": 12} if method == "prefix" else {}
    pm, ours = cls_twins("bert_cls", method, **kw)
    inputs = without_labels(_cls_inputs("bert_cls", token_types=True))
    peftfast.save_adapter(ours, tmp_path / "ours")
    pm.save_pretrained(tmp_path / "peft")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert mine.keys() == theirs.keys() == {"prompt_embeddings", "base_model.classifier.weight",
                                            "base_model.classifier.bias"}
    for key in theirs:
        assert_rel_close(mine[key], theirs[key], TOL, key)
    cfg = ours.peftfast_prompt_learning.configs["default"]
    head = {k.rsplit(".", 1)[-1]: v for k, v in theirs.items() if k != "prompt_embeddings"}
    hand = HandFedClassifier("bert_cls", method, theirs["prompt_embeddings"], head, cfg.num_layers,
                             cfg.num_attention_heads)
    with torch.no_grad():
        expected = hand(**inputs).logits
        loaded = peftfast.load_adapter(make_model("bert_cls"), tmp_path / "peft")
        from_peft = loaded(**inputs).logits
        assert_rel_close(ours(**inputs).logits, expected, TOL, "peftfast's adapter before saving, hand-fed")
        if peft_runs_cls(method, "bert_cls"):
            assert_rel_close(pm(**inputs).logits, expected, TOL, "PEFT's model, hand-fed")
            from_ours = peft.PeftModel.from_pretrained(make_model("bert_cls"), tmp_path / "ours")(**inputs).logits
            assert_rel_close(from_ours, expected, TOL, "PEFT loading peftfast's adapter")
    assert_rel_close(from_peft, expected, TOL, "peftfast loading PEFT's adapter")
    assert peftfast.trainable_parameters(loaded)[0] == 0
    trainable = peftfast.load_adapter(make_model("bert_cls"), tmp_path / "peft", is_trainable=True)
    head = trainable.classifier.modules_to_save["default"]
    assert all(p.requires_grad for p in head.parameters())
    trainable(**_cls_inputs("bert_cls", token_types=True)).loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    peftfast.unpatch(trainable)
    assert isinstance(trainable.classifier, torch.nn.Linear)


def test_classification_adapter_with_a_foreign_key_is_refused(tmp_path):
    from safetensors.torch import save_file

    pm, _ = cls_twins("bert_cls", "prompt")
    pm.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.pooler.dense.weight"] = torch.zeros(32, 32)
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    model = make_model("bert_cls")
    snap = snapshot(model)
    with pytest.raises(peftfast.AdapterLoadError, match="pooler.dense.weight"):
        peftfast.load_adapter(model, tmp_path)
    assert_unchanged(model, snap)


def test_token_classification_prompt_tuning_is_refused():
    model = make_model("bert_cls")
    with pytest.raises(ConfigError, match="TOKEN_CLS"):
        peftfast.patch(model, peft.PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=P))



# --------------------------------------------------------------------------------------------------
# Encoder-decoder (SEQ_2_SEQ_LM): T5 and BART, forward, training and generate()
# --------------------------------------------------------------------------------------------------


def seq2seq_twins(family: str, method: str):
    from peftfast.devtools.coverage import build_model

    cls = peft.PrefixTuningConfig if method == "prefix" else peft.PromptTuningConfig
    base = build_model(family)
    pm = peft.get_peft_model(copy.deepcopy(base), cls(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P))
    with torch.no_grad():
        for p in pm.prompt_encoder["default"].parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    ours = copy.deepcopy(base)
    peftfast.patch(ours, cls(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P))
    ours.peftfast_prompt_learning.encoders["default"].load_state_dict(pm.prompt_encoder["default"].state_dict())
    return pm, ours, base


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_seq2seq_matches_peft(family, method):
    from models import matrix_inputs

    pm, ours, base = seq2seq_twins(family, method)
    inputs = matrix_inputs(family, batch=3, seq=8)
    inputs["decoder_attention_mask"] = torch.ones_like(inputs["decoder_input_ids"])
    with torch.no_grad():
        expected, got = pm(**without_labels(inputs)).logits, ours(**without_labels(inputs)).logits
        plain = base(**without_labels(inputs)).logits
    assert_rel_close(got, expected, TOL, f"{family}/{method} logits")
    # 1e-3: the tiny BART's logits move less (a dropped prompt would be 0; float noise is ~1e-7)
    assert (got - plain).abs().max() > 1e-3, "the prefix/prompt changed nothing: the test would be vacuous"
    train_in_lockstep(pm, ours, inputs, steps=2)
    assert_rel_close(peftfast.adapter_state_dict(ours)["prompt_embeddings"],
                     get_peft_model_state_dict(pm)["prompt_embeddings"], TOL, "prompt_embeddings after training")
    gen = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=5,
               do_sample=False)
    if method == "prefix":  # against the uncached hand-fed oracle: PEFT's generate() departs from it on 5.24
        cfg = ours.peftfast_prompt_learning.configs["default"]
        got, got_logits = oracle.generate_with_logits(ours, gen["input_ids"], gen["attention_mask"], 5)
        expected, expected_logits = oracle.seq2seq_prefix_greedy(
            base, prompt_embeddings(ours), cfg.num_layers, cfg.num_attention_heads, gen["input_ids"],
            gen["attention_mask"], 5)
        assert_rel_close(got_logits, expected_logits, TOL, f"{family}: logits of every generated token")
        assert torch.equal(got, expected)
    with torch.no_grad():
        if method == "prompt" or oracle.peft_speaks_cache_kwarg(base):
            assert torch.equal(ours.generate(**gen), pm.generate(**gen))
        with peftfast.disable_adapters(ours):
            assert torch.equal(ours.generate(**gen), base.generate(**gen))


# --------------------------------------------------------------------------------------------------
# P-tuning (PromptEncoderConfig): prompt tuning whose virtual tokens come out of an MLP / LSTM encoder
# --------------------------------------------------------------------------------------------------


def ptuning_config(kind: str, task_type: str = "CAUSAL_LM", **kw):
    return peft.PromptEncoderConfig(task_type=task_type, num_virtual_tokens=P, encoder_reparameterization_type=kind,
                                    encoder_hidden_size=12, **kw)


def ptuning_twins(family: str, kind: str, task_type: str = "CAUSAL_LM"):
    """(PEFT model, peftfast model, base) with identical random (non-zero) encoder parameters; PEFT's encoder
    state dict loads into ours as it is (same names and shapes)."""
    from peftfast.devtools.coverage import build_model

    base = build_model(family) if task_type == "SEQ_2_SEQ_LM" else make_model(family)
    pm = peft.get_peft_model(copy.deepcopy(base), ptuning_config(kind, task_type))
    with torch.no_grad():
        for p in pm.prompt_encoder["default"].parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    ours = copy.deepcopy(base)
    peftfast.patch(ours, ptuning_config(kind, task_type))
    ours.peftfast_prompt_learning.encoders["default"].load_state_dict(pm.prompt_encoder["default"].state_dict())
    return pm, ours, base


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ptuning_matches_peft(family, kind):
    """Logits, greedy generate() (against the hand-fed oracle, and PEFT where it keeps the cache), 3 AdamW steps
    (losses, final encoder parameters) and the saved tensor."""
    pm, ours, base = ptuning_twins(family, kind)
    assert peftfast.trainable_parameters(ours)[0] == pm.get_nb_trainable_parameters()[0]
    inputs = make_inputs(family, batch=3, seq=9)
    with torch.no_grad():
        expected, got = pm(**without_labels(inputs)).logits, ours(**without_labels(inputs)).logits
        base_logits = base(**without_labels(inputs)).logits
    assert got.shape == expected.shape
    assert_rel_close(got, expected, TOL, f"{family}/{kind} logits")
    assert (got[:, P:] - base_logits).abs().max() > 1e-2, "the prompt changed nothing: the test would be vacuous"
    with torch.no_grad():
        by_hand = oracle_forward(base, ours, without_labels(inputs), "prompt").logits
    assert_rel_close(got, by_hand, TOL, f"{family}/{kind} logits against the hand-fed base model")
    assert_generation_matches(ours, pm, base, without_labels(inputs), "prompt")
    train_in_lockstep(pm, ours, inputs, steps=3)
    theirs = dict(pm.prompt_encoder["default"].named_parameters())
    mine = dict(ours.peftfast_prompt_learning.encoders["default"].named_parameters())
    assert mine.keys() == theirs.keys()
    for name, p in mine.items():
        assert_rel_close(p.detach(), theirs[name].detach(), TOL, name)
    saved, peft_saved = peftfast.adapter_state_dict(ours), get_peft_model_state_dict(pm)
    assert saved.keys() == peft_saved.keys() == {"prompt_embeddings"}
    assert saved["prompt_embeddings"].shape == (P, base.config.hidden_size)
    assert_rel_close(saved["prompt_embeddings"], peft_saved["prompt_embeddings"], TOL, "prompt_embeddings")


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ptuning_adapter_round_trip(tmp_path, family, kind):
    """peftfast's checkpoint loads in PEFT and PEFT's in peftfast (a plain embedding holding the encoder's
    output, as PEFT loads it), both giving PEFT's logits; is_trainable=True trains that embedding."""
    pm, ours, _ = ptuning_twins(family, kind)
    inputs = without_labels(make_inputs(family))
    peftfast.save_adapter(ours, tmp_path / "ours")
    pm.save_pretrained(tmp_path / "peft")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert mine.keys() == theirs.keys() == {"prompt_embeddings"}
    assert_rel_close(mine["prompt_embeddings"], theirs["prompt_embeddings"], TOL, "saved prompt_embeddings")
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key in ("peft_type", "task_type", "num_virtual_tokens", "num_layers", "token_dim", "num_attention_heads",
                "num_transformer_submodules", "encoder_reparameterization_type", "encoder_hidden_size",
                "encoder_num_layers", "encoder_dropout"):
        assert ours_cfg[key] == peft_cfg[key], key
    with torch.no_grad():
        expected = pm(**inputs).logits
        from_ours = peft.PeftModel.from_pretrained(make_model(family), tmp_path / "ours")(**inputs).logits
        loaded = peftfast.load_adapter(make_model(family), tmp_path / "peft")
        from_peft = loaded(**inputs).logits
    assert_rel_close(from_ours, expected, TOL, "PEFT loading peftfast's adapter")
    assert_rel_close(from_peft, expected, TOL, "peftfast loading PEFT's adapter")
    encoder = loaded.peftfast_prompt_learning.encoders["default"]
    assert [n for n, _ in encoder.named_parameters()] == ["embedding.weight"]
    assert peftfast.trainable_parameters(loaded)[0] == 0
    trainable = peftfast.load_adapter(make_model(family), tmp_path / "peft", is_trainable=True)
    weight = trainable.peftfast_prompt_learning.encoders["default"].embedding.weight
    assert weight.requires_grad and peftfast.trainable_parameters(trainable)[0] == weight.numel()
    trainable(**make_inputs(family)).loss.backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_ptuning_seq2seq_matches_peft():
    """T5 with an LSTM encoder: the LSTM runs over all 2P virtual tokens and the first P go before the input."""
    from models import matrix_inputs

    pm, ours, _ = ptuning_twins("t5", "LSTM", task_type="SEQ_2_SEQ_LM")
    inputs = matrix_inputs("t5", batch=2, seq=6)
    with torch.no_grad():
        assert_rel_close(ours(**inputs).logits, pm(**inputs).logits, TOL, "t5 logits")
        gen = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=4,
                   do_sample=False)
        assert torch.equal(ours.generate(**gen), pm.generate(**gen))
    assert_rel_close(peftfast.adapter_state_dict(ours)["prompt_embeddings"],
                     get_peft_model_state_dict(pm)["prompt_embeddings"], TOL, "prompt_embeddings")


def test_ptuning_config_matches_peft(tmp_path):
    from peftfast.config import CONFIG_CLASSES

    ours = peftfast.PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type="LSTM",
                                        encoder_hidden_size=16, encoder_num_layers=3, encoder_dropout=0.1)
    theirs = peft.PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type="LSTM",
                                      encoder_hidden_size=16, encoder_num_layers=3, encoder_dropout=0.1)
    assert peftfast.as_config(theirs) == ours
    assert peftfast.as_config(theirs.to_dict()) == ours
    assert peftfast.as_config(json.loads(ours.to_json_string())) == ours
    theirs.save_pretrained(tmp_path / "peft")
    assert peftfast.as_config(tmp_path / "peft") == ours
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "adapter_config.json").write_text(ours.to_json_string())
    loaded = peft.PeftConfig.from_pretrained(str(tmp_path / "ours"))
    assert isinstance(loaded, peft.PromptEncoderConfig) and loaded.encoder_num_layers == 3
    assert CONFIG_CLASSES["P_TUNING"] is peftfast.PromptEncoderConfig
    # defaults agree with peft's, field by field, for every registered config
    for name, cls in CONFIG_CLASSES.items():
        mine, peft_defaults = cls().to_dict(), getattr(peft, cls.__name__)().to_dict()
        for key in mine:
            if key in peft_defaults and key != "task_type":
                assert mine[key] == peft_defaults[key], (name, key)
    with pytest.raises(ConfigError, match="encoder_reparameterization_type"):
        peftfast.as_config({"peft_type": "P_TUNING", "num_virtual_tokens": 4, "encoder_reparameterization_type": "GRU"})
    with pytest.raises(ConfigError, match="TOKEN_CLS"):
        peftfast.patch(make_model("bert_cls"), ptuning_config("MLP", task_type="TOKEN_CLS"))
