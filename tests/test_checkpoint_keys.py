"""The PEFT key table (peftfast.checkpoint_keys) and the files save_adapter writes with it.

The saved file of each adapter kind is compared byte for byte with a safetensors file built here from keys
written out literally (PEFT's forms) and tensors read straight off the wrapper attributes, so a change to the
table, to the save loop or to the order of its rules that moves any key or value fails here. Loading the file
into a fresh base and saving again must give the same bytes.
"""

import pytest
import torch
from safetensors.torch import save as safetensors_bytes
from transformers import LlamaConfig, LlamaForSequenceClassification

import peftfast
from peftfast import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig
from peftfast import checkpoint_keys as ck
from peftfast.layers import AdapterLayer

from tiny import tiny_llama

LAYERS = (0, 1)
P = "base_model.model."


def _perturb(model, adapter: str, seed: int) -> None:
    """Move every tensor of ``adapter`` off its initial value (IA3 ones, zero biases, base-row token deltas)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if f".{adapter}" in name or name.startswith("peftfast_prompt_learning"):
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)


def _attn(model, i, proj):
    return getattr(model.model.layers[i].self_attn, proj)


def _attn_tensors(model, projs, parts: dict) -> dict:
    """{PEFT key: tensor} for every layer's attention projections in ``projs``; ``parts`` maps the key's
    ending to the tensor's place on the (wrapped) projection."""
    return {f"{P}model.layers.{i}.self_attn.{proj}.{end}": get(_attn(model, i, proj))
            for i in LAYERS for proj in projs for end, get in parts.items()}


def _lora_dora_tokens():
    model = tiny_llama(attention_bias=True)
    peftfast.patch(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True,
                                     init_lora_weights=False, trainable_token_indices=[3, 5, 9]))
    _perturb(model, "default", 1)
    want = _attn_tensors(model, ("q_proj", "v_proj"), {
        "lora_A.weight": lambda layer: layer.lora_A["default"].weight,
        "lora_B.weight": lambda layer: layer.lora_B["default"].weight,
        "lora_magnitude_vector": lambda layer: layer.lora_magnitude_vector["default"].weight,
    })
    want[P + "model.embed_tokens.token_adapter.trainable_tokens_delta"] = \
        model.model.embed_tokens.trainable_tokens_delta["default"]
    return model, "default", want


def _lora_bias_second_adapter():
    model = tiny_llama(attention_bias=True)
    peftfast.patch(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    peftfast.patch(model, LoraConfig(r=2, target_modules=["k_proj", "o_proj"], lora_bias=True, init_lora_weights=False),
                   adapter_name="other")
    _perturb(model, "other", 2)
    return model, "other", _attn_tensors(model, ("k_proj", "o_proj"), {
        "lora_A.weight": lambda layer: layer.lora_A["other"].weight,
        "lora_B.weight": lambda layer: layer.lora_B["other"].weight,
        "lora_B.bias": lambda layer: layer.lora_B["other"].bias,
    })


def _embedding_bias_all_modules_to_save():
    model = tiny_llama(attention_bias=True)
    peftfast.patch(model, LoraConfig(r=4, target_modules=["embed_tokens", "gate_proj"], bias="all",
                                     modules_to_save=["lm_head"], init_lora_weights=False))
    _perturb(model, "default", 3)
    with torch.no_grad():  # the base biases bias="all" saves start at zero: make them tell apart
        for name, p in sorted(model.named_parameters()):
            if name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    emb = model.model.embed_tokens
    want = {
        P + "model.embed_tokens.lora_embedding_A": emb.lora_embedding_A["default"],
        P + "model.embed_tokens.lora_embedding_B": emb.lora_embedding_B["default"],
        P + "model.embed_tokens.base_layer.weight": emb.base_layer.weight,  # PEFT saves a targeted embedding's base
        P + "lm_head.weight": model.lm_head.modules_to_save["default"].weight,
    }
    for i in LAYERS:
        gate = model.model.layers[i].mlp.gate_proj
        want[f"{P}model.layers.{i}.mlp.gate_proj.lora_A.weight"] = gate.lora_A["default"].weight
        want[f"{P}model.layers.{i}.mlp.gate_proj.lora_B.weight"] = gate.lora_B["default"].weight
    want.update(_attn_tensors(model, ("q_proj", "k_proj", "v_proj", "o_proj"), {"bias": lambda layer: layer.bias}))
    return model, "default", want


def _ia3():
    model = tiny_llama()
    peftfast.patch(model, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                                    init_ia3_weights=False))
    _perturb(model, "default", 4)
    want = _attn_tensors(model, ("k_proj", "v_proj"), {"ia3_l": lambda layer: layer.ia3_l["default"]})
    for i in LAYERS:
        want[f"{P}model.layers.{i}.mlp.down_proj.ia3_l"] = model.model.layers[i].mlp.down_proj.ia3_l["default"]
    return model, "default", want


def _prefix():
    model = tiny_llama()
    model.config._attn_implementation = "sdpa"
    peftfast.patch(model, PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    _perturb(model, "default", 5)
    encoder = model.peftfast_prompt_learning.encoders["default"]
    return model, "default", {"prompt_embeddings": encoder.prompt_embeddings()}


def _prompt_classifier():
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, num_labels=3)).eval()
    peftfast.patch(model, PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS"))
    _perturb(model, "default", 6)
    # Prompt learning: PEFT's base_model is the transformers model itself, hence "base_model." alone.
    return model, "default", {
        "prompt_embeddings": model.peftfast_prompt_learning.encoders["default"].embedding.weight,
        "base_model.score.weight": model.score.modules_to_save["default"].weight,
    }


CASES = {
    "lora_dora_trainable_tokens": _lora_dora_tokens,
    "lora_bias_second_adapter": _lora_bias_second_adapter,
    "embedding_bias_all_modules_to_save": _embedding_bias_all_modules_to_save,
    "ia3": _ia3,
    "prefix_tuning": _prefix,
    "prompt_tuning_seq_cls": _prompt_classifier,
}


def _fresh_base(model):
    if isinstance(model, LlamaForSequenceClassification):
        torch.manual_seed(0)
        return LlamaForSequenceClassification(model.config).eval()
    return tiny_llama(attention_bias=bool(model.config.attention_bias))


@pytest.mark.parametrize("case", list(CASES))
def test_saved_bytes_are_the_literal_keys_and_the_wrapper_tensors(case, tmp_path):
    model, adapter, want = CASES[case]()
    path = tmp_path / "adapter"
    peftfast.save_adapter(model, path, adapter_name=adapter)
    got = (path / "adapter_model.safetensors").read_bytes()
    expected = safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in want.items()}, metadata={"format": "pt"})
    if got != expected:  # name the difference, not just "bytes differ"
        saved = peftfast.checkpoint.read_adapter_weights(str(path))
        assert sorted(saved) == sorted(want), "saved keys differ from PEFT's forms"
        bad = [k for k in want if not torch.equal(saved[k], want[k].detach().cpu())]
        pytest.fail(f"same keys, different tensors or header: {bad[:3]}")

    other = _fresh_base(model)
    peftfast.load_adapter(other, path, adapter_name=adapter)
    again = tmp_path / "again"
    peftfast.save_adapter(other, again, adapter_name=adapter)
    assert (again / "adapter_model.safetensors").read_bytes() == got, "load -> save changed the file"


ROW_EXAMPLES = {
    # attr: (model state-dict key, PEFT key), for adapter "ad+1" (a regex character in it; module names
    # never hold a dot, so neither do adapter names)
    "lora_A": ("m.q.lora_A.ad+1.weight", "m.q.lora_A.weight"),
    "lora_B": ("m.q.lora_B.ad+1.bias", "m.q.lora_B.bias"),
    "lora_magnitude_vector": ("m.q.lora_magnitude_vector.ad+1.weight", "m.q.lora_magnitude_vector"),
    "lora_embedding_A": ("m.emb.lora_embedding_A.ad+1", "m.emb.lora_embedding_A"),
    "lora_embedding_B": ("m.emb.lora_embedding_B.ad+1", "m.emb.lora_embedding_B"),
    "ia3_l": ("m.k.ia3_l.ad+1", "m.k.ia3_l"),
    "trainable_tokens_delta": ("m.emb.trainable_tokens_delta.ad+1", "m.emb.token_adapter.trainable_tokens_delta"),
}


def test_every_row_maps_both_ways_and_only_its_own_keys():
    assert sorted(ROW_EXAMPLES) == sorted(ck.BY_ATTR), "a row without an example here"
    for attr, (model_key, saved) in ROW_EXAMPLES.items():
        assert ck.adapter_param(model_key, "ad+1") is ck.BY_ATTR[attr]
        assert ck.peft_key(model_key, "ad+1") == saved
        assert ck.model_key(ck.PREFIX + saved, "ad+1") == model_key
        assert ck.is_adapter_key(model_key, "ad+1")
        assert ck.peft_key(model_key, "ad") is None, "another adapter's tensor taken"
        assert not ck.is_adapter_key(model_key.replace("ad+1", "ad+12"), "ad+1")
    # modules_to_save copies, and keys that are nobody's
    assert ck.peft_key("score.modules_to_save.ad+1.weight", "ad+1") == "score.weight"
    assert ck.model_key(ck.PREFIX + "score.weight", "ad+1", ["score"]) == "score.modules_to_save.ad+1.weight"
    assert ck.peft_key("score.original_module.weight", "ad+1") is None
    assert ck.model_key(ck.PREFIX + "m.q.bias", "ad+1", ["score"]) == "m.q.bias"


def test_wrapper_classes_name_only_table_rows():
    # the embedding / conv and trainable-token wrappers are defined by these modules
    from peftfast.layers import conv_embedding, trainable_tokens  # noqa: F401

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    names = {n for cls in subclasses(AdapterLayer) for n in cls.adapter_param_names}
    assert names and names <= set(ck.BY_ATTR)
    with pytest.raises(TypeError, match="not_in_the_table.*ADAPTER_PARAMS"):
        type("Bad", (AdapterLayer,), {"adapter_param_names": ("lora_A", "not_in_the_table")})
