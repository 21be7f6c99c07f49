"""A tiny random Llama for tests that need a real transformers model but not a family sweep."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def snapshot(model) -> tuple:
    """Module types by name, and a copy of the state dict with requires_grad flags: enough to tell
    whether a model changed at all."""
    types = {n: type(m) for n, m in model.named_modules()}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    return types, state, grads


def assert_unchanged(model, snap) -> None:
    types, state, grads = snap
    now_types, now_state, now_grads = snapshot(model)
    assert now_types == types, "module types changed"
    assert now_state.keys() == state.keys(), "state_dict keys changed"
    for k in state:
        assert torch.equal(now_state[k], state[k]), f"{k} changed"
    assert now_grads == grads, "requires_grad flags changed"
    assert "peftfast_state" not in model.__dict__, "patch bookkeeping left behind"
