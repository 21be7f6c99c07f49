"""A tiny random Llama for tests that need a real transformers model but not a family sweep."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def byte_chat_tokenizer():
    """A byte-level fast tokenizer (256 byte tokens + <s>, </s>, <pad>, <|im_start|>, <|im_end|>) with a
    ChatML-like chat template, built locally: nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for t in ("<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"):
        vocab[t] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                         "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def tiny_llama_for(tok, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A tiny random Llama whose vocabulary and special ids match ``tok``."""
    cfg = dict(vocab_size=len(tok), max_position_embeddings=128, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tiny_llama(seed, **{**cfg, **overrides})


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
