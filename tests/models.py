"""Tiny random transformers models built from configs (no downloads), and inputs for them.

``make_model(family)`` returns a fresh, deterministic (seeded) float32 model in eval mode with every
dropout at 0, so train-mode forwards are deterministic too and PEFT/peftfast parity can be exact up to
float rounding. ``quantize_4bit(model, ...)`` turns its linear layers (all but the LM head) into
bitsandbytes ``Linear4bit`` layers on CPU.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import transformers as tf

VOCAB = 96
HIDDEN = 32
PAD = 0

# family -> (model class, config class, config kwargs, task kind)
_DECODER = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, attention_dropout=0.0,
)
FAMILIES = {
    "llama": (tf.LlamaForCausalLM, tf.LlamaConfig, dict(_DECODER), "causal"),
    "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config, dict(_DECODER), "causal"),
    "mistral": (tf.MistralForCausalLM, tf.MistralConfig, dict(_DECODER, sliding_window=None), "causal"),
    "gpt2": (
        tf.GPT2LMHeadModel, tf.GPT2Config,
        dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
             embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD, bos_token_id=1, eos_token_id=2),
        "causal",
    ),
    "opt": (
        tf.OPTForCausalLM, tf.OPTConfig,
        dict(vocab_size=VOCAB, hidden_size=HIDDEN, word_embed_proj_dim=HIDDEN, ffn_dim=64, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
             activation_dropout=0.0, layerdrop=0.0, pad_token_id=PAD),
        "causal",
    ),
    "bert_cls": (
        tf.BertForSequenceClassification, tf.BertConfig,
        dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
             classifier_dropout=0.0, num_labels=3, pad_token_id=PAD),
        "seq_cls",
    ),
    "llama_cls": (tf.LlamaForSequenceClassification, tf.LlamaConfig, dict(_DECODER, num_labels=3), "seq_cls"),
    "t5": (
        tf.T5ForConditionalGeneration, tf.T5Config,
        dict(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
             relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=PAD, decoder_start_token_id=PAD),
        "seq2seq",
    ),
}


def task_kind(family: str) -> str:
    return FAMILIES[family][3]


def make_model(family: str, seed: int = 0) -> nn.Module:
    """A fresh tiny random model of ``family`` (a key of FAMILIES), eval mode, float32, eager attention."""
    model_cls, config_cls, kwargs, _ = FAMILIES[family]
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    return model


def make_inputs(family: str, batch: int = 2, seq: int = 7, seed: int = 1) -> dict:
    """Token ids with LEFT padding (row i has i*2 pad tokens) and the matching attention mask.

    Seq-to-seq families also get ``decoder_input_ids``; every family gets ``labels`` for a loss.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for i in range(batch):
        n_pad = min(2 * i, seq - 2)
        ids[i, :n_pad] = PAD
        mask[i, :n_pad] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    kind = task_kind(family)
    if kind == "causal":
        out["labels"] = ids.masked_fill(mask == 0, -100)
    elif kind == "seq_cls":
        out["labels"] = torch.randint(0, 3, (batch,), generator=g)
    else:
        dec = torch.randint(1, VOCAB, (batch, 5), generator=g)
        out["decoder_input_ids"] = dec
        out["labels"] = torch.randint(1, VOCAB, (batch, 5), generator=g)
    return out


def without_labels(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k != "labels"}


def quantize_4bit(
    model: nn.Module,
    quant_type: str = "nf4",
    nested: bool = True,
    quant_storage: torch.dtype = torch.uint8,
    skip: tuple = ("lm_head",),
    compute_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Replace every nn.Linear (except names ending in ``skip``) by a bitsandbytes Linear4bit, in place, on CPU.

    The 4-bit layers compute in ``compute_dtype`` (float32 by default, so that the only error against the
    dense model is bitsandbytes' quantization of the weights).
    """
    import bitsandbytes as bnb

    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and not n.endswith(skip)]
    for name in names:
        lin = model.get_submodule(name)
        q = bnb.nn.Linear4bit(
            lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=compute_dtype,
            compress_statistics=nested, quant_type=quant_type, quant_storage=quant_storage, device="cpu",
        )
        q.weight = bnb.nn.Params4bit(
            lin.weight.data.float().clone(), requires_grad=False, quant_type=quant_type, compress_statistics=nested,
            quant_storage=quant_storage, module=q,  # bnb keeps the quant state on the module too (FSDP)
        )._quantize("cpu")
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=lin.bias.requires_grad)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, q)
    model.is_loaded_in_4bit = True
    return model




# ------------------------------------------------------------------------------------------------------
# The coverage matrix's families (tests/test_coverage_matrix.py). The family table lives in
# peftfast/devtools/coverage.py, which renders the README table from the same list; these add inputs.
# ------------------------------------------------------------------------------------------------------


def matrix_model(family: str, method: str = "lora", seed: int = 0) -> nn.Module:
    """A tiny model of a coverage family (``peftfast.devtools.coverage.FAMILIES``), 4-bit for ``lora-4bit``."""
    from peftfast.devtools.coverage import build_base

    return build_base(family, method, seed)


def matrix_inputs(family: str, batch: int = 2, seq: int = 7, seed: int = 1) -> dict:
    """Inputs with labels for a coverage family: left-padded text (row i has 2*i pads), images, or both."""
    from peftfast.devtools import coverage

    fam = coverage.FAMILIES[family]
    g = torch.Generator().manual_seed(seed)
    out: dict = {}
    if fam.inputs in ("image", "image_text"):
        out["pixel_values"] = torch.randn(batch, 3, coverage.IMAGE_SIZE, coverage.IMAGE_SIZE, generator=g)
    if fam.inputs == "image":
        if fam.task is None and family == "segformer":
            out["labels"] = torch.randint(0, coverage.NUM_LABELS, (batch, coverage.IMAGE_SIZE, coverage.IMAGE_SIZE), generator=g)
        else:
            out["labels"] = torch.randint(0, coverage.NUM_LABELS, (batch,), generator=g)
        return out
    ids = torch.randint(3, coverage.VOCAB - 1, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for i in range(batch):
        n_pad = min(2 * i, seq - 2)
        ids[i, :n_pad] = coverage.PAD
        mask[i, :n_pad] = 0
    if fam.inputs == "image_text":  # the query tokens' placeholders go first, then the text
        q = coverage.BLIP2_QUERY_TOKENS
        ids = torch.cat([torch.full((batch, q), coverage.BLIP2_IMAGE_TOKEN), ids], dim=1)
        mask = torch.cat([torch.ones(batch, q, dtype=torch.long), mask], dim=1)
    out.update(input_ids=ids, attention_mask=mask)
    if fam.task == "SEQ_CLS":
        out["labels"] = torch.randint(0, coverage.NUM_LABELS, (batch,), generator=g)
    elif fam.task == "TOKEN_CLS":
        out["labels"] = torch.randint(0, coverage.NUM_LABELS, (batch, seq), generator=g).masked_fill(mask == 0, -100)
    elif fam.task == "SEQ_2_SEQ_LM":
        out["decoder_input_ids"] = torch.randint(3, coverage.VOCAB, (batch, 5), generator=g)
        out["labels"] = torch.randint(3, coverage.VOCAB, (batch, 5), generator=g)
    else:  # causal LM, image-to-text
        out["labels"] = ids.masked_fill((mask == 0) | (ids == coverage.BLIP2_IMAGE_TOKEN), -100)
    return out
