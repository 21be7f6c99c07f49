"""Which computation path each adapted layer takes, per model family and method, and the README table.

The answer is computed, never typed: :func:`layer_paths` resolves a config's targets on a model with
the same code ``patch`` uses (:func:`peftfast.targets.resolve_targets` and the predicates the wrappers
dispatch on: ``is_linear_like``, ``is_lora_extra``, ``kernel_weight(...) is None``, and prompt
learning's own checks) and names the path of each:

* ``fused``: the Triton kernels (LoRA / DoRA / IA3 on ``nn.Linear``, transformers ``Conv1D`` and
  bitsandbytes ``Linear4bit``; the prefix-attention kernel for prefix tuning on sdpa/eager attention).
  They run for CUDA tensors with ``backend="auto"`` (and on CPU with ``backend="triton"`` under
  ``TRITON_INTERPRET=1``); elsewhere the same layers run their ``*_reference`` PyTorch ops.
* ``reference``: PyTorch ops by design (LoRA on ``nn.Embedding`` / ``nn.Conv1d`` / ``nn.Conv2d``;
  prompt tuning, which only prepends embeddings; prefix tuning on encoder-decoder models, fed as PEFT's
  KV cache; bitsandbytes 8-bit bases, which run their own matmul and add the LoRA term).
* ``unsupported``: ``patch`` refuses it (the reason is peftfast's own error message).

:data:`FAMILIES` is the one list of tiny model families the coverage matrix test
(``tests/test_coverage_matrix.py``) builds and the README table is rendered from::

    python3 -m peftfast.devtools.coverage --markdown      # prints the table between the README's markers
    python3 -m peftfast.devtools.coverage --write-readme  # rewrites that block of README.md in place
"""
from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from ..config import (
    PROMPT_LEARNING_CONFIGS, ConfigError, IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, as_config,
)

FUSED, REFERENCE, UNSUPPORTED = "fused", "reference", "unsupported"
METHODS = ("lora", "lora-4bit", "ia3", "prefix", "prompt")
METHOD_TITLES = {"lora": "LoRA", "lora-4bit": "LoRA, 4-bit base", "ia3": "IA3", "prefix": "prefix tuning",
                 "prompt": "prompt tuning"}
README_START, README_END = "<!-- coverage-table:start -->", "<!-- coverage-table:end -->"
REGENERATE = "python3 -m peftfast.devtools.coverage --write-readme"

# ----------------------------------------------------------------------------------------------------
# The tiny families (random weights from configs: no downloads)
# ----------------------------------------------------------------------------------------------------

VOCAB, HIDDEN, PAD = 96, 32, 0
IMAGE_SIZE, NUM_LABELS = 16, 3
BLIP2_QUERY_TOKENS, BLIP2_IMAGE_TOKEN = 4, VOCAB - 1

_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD,
                   attention_dropout=0.0)
_GPT2 = dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
             attn_pdrop=0.0, summary_first_dropout=0.0, classifier_dropout=0.0, pad_token_id=PAD, bos_token_id=1,
             eos_token_id=2)
_BERT = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
             classifier_dropout=0.0, pad_token_id=PAD)
_OPT = dict(vocab_size=VOCAB, hidden_size=HIDDEN, word_embed_proj_dim=HIDDEN, ffn_dim=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, layerdrop=0.0, pad_token_id=PAD)
_CLS = dict(num_labels=NUM_LABELS)
# attention/MLP module names differ between transformers versions (key/value/output.dense before 5.x's
# k_proj/v_proj/fc2 renames); lists match whichever exist
_VISION_IA3 = (["key", "value", "k_proj", "v_proj", "output.dense", "fc2"], ["output.dense", "fc2"])


@dataclass(frozen=True)
class Family:
    """One row of the matrix: a transformers class built from a tiny config.

    ``task``: the PEFT task type (``None`` for vision tasks PEFT has no type for), ``heads``: modules
    trained in full (``modules_to_save``) where no task type adds them, ``ia3``: explicit
    ``(target_modules, feedforward_modules)`` for families without an IA3 default in peftfast.
    """

    label: str
    model_class: str
    config_class: str
    config: dict
    task: Optional[str]
    inputs: str  # "text", "seq2seq", "image", "image_text": what tests feed it
    heads: tuple = ()
    ia3: Optional[tuple] = None
    sub_configs: dict = field(default_factory=dict)  # name -> (config class, kwargs), for composite models


FAMILIES = {
    # causal LM
    "gpt2": Family("GPT-2", "GPT2LMHeadModel", "GPT2Config", _GPT2, "CAUSAL_LM", "text"),
    "bloom": Family("Bloom", "BloomForCausalLM", "BloomConfig", dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=2, n_head=4, hidden_dropout=0.0, attention_dropout=0.0,
        pad_token_id=PAD), "CAUSAL_LM", "text"),
    "opt": Family("OPT", "OPTForCausalLM", "OPTConfig", _OPT, "CAUSAL_LM", "text"),
    "gpt_neo": Family("GPT-Neo", "GPTNeoForCausalLM", "GPTNeoConfig", dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        window_size=4, intermediate_size=64, max_position_embeddings=64, embed_dropout=0.0, attention_dropout=0.0,
        resid_dropout=0.0, pad_token_id=PAD), "CAUSAL_LM", "text",
        ia3=(["k_proj", "v_proj", "c_proj"], ["c_proj"])),
    "gptj": Family("GPT-J", "GPTJForCausalLM", "GPTJConfig", dict(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, rotary_dim=4, n_positions=64, n_inner=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD), "CAUSAL_LM", "text",
        ia3=(["k_proj", "v_proj", "fc_out"], ["fc_out"])),
    "gpt_neox": Family("GPT-NeoX", "GPTNeoXForCausalLM", "GPTNeoXConfig", dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, rotary_pct=0.5, attention_dropout=0.0, hidden_dropout=0.0, pad_token_id=PAD),
        "CAUSAL_LM", "text"),
    "llama": Family("Llama", "LlamaForCausalLM", "LlamaConfig", _LLAMA_LIKE, "CAUSAL_LM", "text"),
    "mistral": Family("Mistral", "MistralForCausalLM", "MistralConfig", dict(_LLAMA_LIKE, sliding_window=None),
                      "CAUSAL_LM", "text"),
    "qwen2": Family("Qwen2", "Qwen2ForCausalLM", "Qwen2Config", _LLAMA_LIKE, "CAUSAL_LM", "text"),
    "gemma": Family("Gemma", "GemmaForCausalLM", "GemmaConfig", dict(_LLAMA_LIKE, head_dim=8), "CAUSAL_LM", "text"),
    "phi": Family("Phi", "PhiForCausalLM", "PhiConfig", dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
        partial_rotary_factor=0.5, pad_token_id=PAD), "CAUSAL_LM", "text"),
    # seq2seq LM
    "t5": Family("T5", "T5ForConditionalGeneration", "T5Config", dict(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=PAD, decoder_start_token_id=PAD),
        "SEQ_2_SEQ_LM", "seq2seq"),
    "bart": Family("BART", "BartForConditionalGeneration", "BartConfig", dict(
        vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=2, forced_eos_token_id=None), "SEQ_2_SEQ_LM", "seq2seq"),
    # sequence classification
    "bert-seq-cls": Family("BERT", "BertForSequenceClassification", "BertConfig", dict(_BERT, **_CLS), "SEQ_CLS", "text"),
    "roberta-seq-cls": Family("RoBERTa", "RobertaForSequenceClassification", "RobertaConfig",
                              dict(_BERT, max_position_embeddings=72, **_CLS), "SEQ_CLS", "text"),
    "deberta-seq-cls": Family("DeBERTa", "DebertaForSequenceClassification", "DebertaConfig", dict(
        _BERT, pooler_dropout=0.0, **_CLS), "SEQ_CLS", "text", ia3=(["in_proj", "output.dense"], ["output.dense"])),
    "deberta-v2-seq-cls": Family("DeBERTa-v2", "DebertaV2ForSequenceClassification", "DebertaV2Config", dict(
        _BERT, pooler_dropout=0.0, **_CLS), "SEQ_CLS", "text",
        ia3=(["key_proj", "value_proj", "output.dense"], ["output.dense"])),
    "gpt2-seq-cls": Family("GPT-2", "GPT2ForSequenceClassification", "GPT2Config", dict(_GPT2, **_CLS), "SEQ_CLS", "text"),
    "llama-seq-cls": Family("Llama", "LlamaForSequenceClassification", "LlamaConfig", dict(_LLAMA_LIKE, **_CLS),
                            "SEQ_CLS", "text"),
    # token classification
    "bert-tok-cls": Family("BERT", "BertForTokenClassification", "BertConfig", dict(_BERT, **_CLS), "TOKEN_CLS", "text"),
    "roberta-tok-cls": Family("RoBERTa", "RobertaForTokenClassification", "RobertaConfig",
                              dict(_BERT, max_position_embeddings=72, **_CLS), "TOKEN_CLS", "text"),
    "gpt2-tok-cls": Family("GPT-2", "GPT2ForTokenClassification", "GPT2Config", dict(_GPT2, **_CLS), "TOKEN_CLS", "text"),
    # vision
    "vit": Family("ViT", "ViTForImageClassification", "ViTConfig", dict(
        image_size=IMAGE_SIZE, patch_size=4, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        **_CLS), None, "image", heads=("classifier",), ia3=_VISION_IA3),
    "swin": Family("Swin", "SwinForImageClassification", "SwinConfig", dict(
        image_size=IMAGE_SIZE, patch_size=4, num_channels=3, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
        window_size=2, mlp_ratio=2.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0,
        **_CLS), None, "image", heads=("classifier",), ia3=_VISION_IA3),
    "segformer": Family("SegFormer", "SegformerForSemanticSegmentation", "SegformerConfig", dict(
        num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
        patch_sizes=[3, 3], strides=[2, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=32,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0, drop_path_rate=0.0,
        **_CLS), None, "image", heads=("decode_head",), ia3=(["key", "value", "k_proj", "v_proj", "dense2", "fc2"], ["dense2", "fc2"])),
    "blip2": Family("Blip-2", "Blip2ForConditionalGeneration", "Blip2Config", dict(
        num_query_tokens=BLIP2_QUERY_TOKENS, image_token_index=BLIP2_IMAGE_TOKEN), "CAUSAL_LM", "image_text",
        ia3=(["k_proj", "v_proj", "fc2"], ["fc2"]),
        sub_configs=dict(
            vision_config=("Blip2VisionConfig", dict(
                hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                image_size=IMAGE_SIZE, patch_size=4, attention_dropout=0.0)),
            qformer_config=("Blip2QFormerConfig", dict(
                vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=4,
                intermediate_size=64, encoder_hidden_size=HIDDEN, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, max_position_embeddings=64, pad_token_id=PAD)),
            text_config=("OPTConfig", _OPT),
        )),
}

TASK_TITLES = {"CAUSAL_LM": "causal LM", "SEQ_2_SEQ_LM": "seq2seq LM", "SEQ_CLS": "sequence classification",
               "TOKEN_CLS": "token classification"}
VISION_TITLES = {"vit": "image classification", "swin": "image classification", "segformer": "semantic segmentation",
                 "blip2": "image-to-text"}

# Cells Hugging Face PEFT itself refuses or cannot apply, with what it says. Not decided here:
# tests/test_coverage_matrix.py tries PEFT on every cell and fails when this set is wrong either way.
_NO_TASK = "PEFT's prompt learning needs a task type and there is none for this task (KeyError: None)"
_TOKEN_CLS_PROMPT = ("PEFT returns logits for the virtual tokens too and does not pad the labels, so the loss "
                     "raises (batch size mismatch)")
PEFT_UNSUPPORTED: dict = {
    ("deberta-seq-cls", "prefix"): "PEFT: 'Model does not support past key values which are required for prefix tuning'",
    ("deberta-v2-seq-cls", "prefix"): "PEFT: 'Model does not support past key values which are required for prefix tuning'",
    ("bert-tok-cls", "prompt"): _TOKEN_CLS_PROMPT,
    ("roberta-tok-cls", "prompt"): _TOKEN_CLS_PROMPT,
    ("gpt2-tok-cls", "prompt"): _TOKEN_CLS_PROMPT,
    ("vit", "prefix"): _NO_TASK, ("vit", "prompt"): _NO_TASK,
    ("swin", "prefix"): _NO_TASK, ("swin", "prompt"): _NO_TASK,
    ("segformer", "prefix"): _NO_TASK, ("segformer", "prompt"): _NO_TASK,
    ("blip2", "prompt"): "PEFT passes the token ids on with the virtual-token embeddings, and Blip-2's forward "
                         "fails (RuntimeError: mat1 and mat2 must have the same dtype)",
}

# Families left out of the matrix, and why.
NOT_IN_MATRIX = {
    "ChatGLM": "needs `trust_remote_code` (its modeling code lives on the Hub, not in transformers) and the tests "
               "run no downloaded code",
}


def task_title(name: str) -> str:
    fam = FAMILIES[name]
    return VISION_TITLES[name] if name in VISION_TITLES else TASK_TITLES[fam.task]


def build_model(name: str, seed: int = 0, attn_implementation: str = "eager") -> nn.Module:
    """A fresh tiny random float32 model of family ``name``, eval mode, every dropout 0 (deterministic)."""
    import transformers as tf

    fam = FAMILIES[name]
    kwargs = dict(fam.config)
    for key, (cls_name, sub) in fam.sub_configs.items():
        kwargs[key] = getattr(tf, cls_name)(**sub).to_dict()
    config = getattr(tf, fam.config_class)(**kwargs)
    config._attn_implementation = attn_implementation
    for key in fam.sub_configs:
        getattr(config, key)._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return getattr(tf, fam.model_class)(config).float().eval()


def head_names(model: nn.Module, name: str) -> tuple:
    """Names (suffixes) of the modules that stay dense in a 4-bit model: output embeddings, task heads and
    the model's ``_keep_in_fp32_modules``."""
    from ..config import TASK_HEADS

    fam = FAMILIES[name]
    keep = set(fam.heads) | set(TASK_HEADS.get(fam.task or "", []))
    # transformers keeps these in float32 under bitsandbytes too (T5's `wo`: its forward casts to wo's dtype)
    keep |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    out = getattr(model, "get_output_embeddings", lambda: None)()
    keep |= {n for n, m in model.named_modules() if out is not None and m is out}
    return tuple(sorted(keep))


def to_4bit(model: nn.Module, skip: tuple = (), quant_type: str = "nf4") -> nn.Module:
    """Replace nn.Linear and transformers Conv1D layers (names not ending in ``skip``) by bitsandbytes
    ``Linear4bit`` (nested NF4, float32 compute), in place on CPU, as transformers' bitsandbytes
    integration does (Conv1D weights are transposed to [out, in])."""
    import bitsandbytes as bnb

    from ..layers.base_weight import Conv1D

    names = [n for n, m in model.named_modules()
             if (type(m) is nn.Linear or (bool(Conv1D) and isinstance(m, Conv1D)))
             and not any(n == s or n.endswith("." + s) or ("." + s + ".") in ("." + n) for s in skip)]
    for n in names:
        lin = model.get_submodule(n)
        w = lin.weight.data.t() if not isinstance(lin, nn.Linear) else lin.weight.data
        q = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=lin.bias is not None, compute_dtype=torch.float32,
                              compress_statistics=True, quant_type=quant_type, device="cpu")
        q.weight = bnb.nn.Params4bit(w.clone().contiguous(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=True)._quantize("cpu")
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        parent, _, attr = n.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, q)
    model.is_loaded_in_4bit = True
    return model


def build_base(name: str, method: str, seed: int = 0) -> nn.Module:
    """The base model a cell starts from (4-bit for ``lora-4bit``)."""
    model = build_model(name, seed)
    if method == "lora-4bit":
        to_4bit(model, head_names(model, name))
    return model


def method_kwargs(name: str, method: str) -> dict:
    """The config fields of a cell, valid for both ``peft`` and peftfast config classes (tests add
    their non-zero init). LoRA targets every linear layer; IA3 uses the family default where peftfast
    has one, explicit modules otherwise; prefix/prompt use 4 virtual tokens."""
    from ..targets import DEFAULT_IA3_TARGETS

    fam = FAMILIES[name]
    kw: dict = dict(task_type=fam.task)
    if fam.heads:
        kw["modules_to_save"] = list(fam.heads)
    if method in ("lora", "lora-4bit"):
        kw.update(r=4, lora_alpha=8, target_modules="all-linear")
        if fam.task == "TOKEN_CLS":
            # PEFT's "all-linear" leaves the head out for SEQ_CLS only; for TOKEN_CLS it would wrap the head
            # it also adds to modules_to_save, and refuses (TypeError). Exclude it explicitly for both.
            kw["exclude_modules"] = ["classifier"]
    elif method == "ia3":
        model_type = getattr(getattr(__import__("transformers"), fam.config_class), "model_type", None)
        if model_type not in DEFAULT_IA3_TARGETS:
            targets, ff = fam.ia3
            kw.update(target_modules=list(targets), feedforward_modules=list(ff))
    else:
        kw.update(num_virtual_tokens=4)
    return kw


def method_config(name: str, method: str):
    """A peftfast config for a cell."""
    cls = {"lora": LoraConfig, "lora-4bit": LoraConfig, "ia3": IA3Config, "prefix": PrefixTuningConfig,
           "prompt": PromptTuningConfig}[method]
    return cls(**method_kwargs(name, method))


# ----------------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------------


@dataclass
class Cell:
    """What ``patch`` would do with a config on a model: per adapted layer (or ``"<attention>"`` /
    ``"<embeddings>"`` for prompt learning) its path, and the overall path (``reason`` when unsupported)."""

    layers: dict
    reason: Optional[str] = None

    @property
    def path(self) -> str:
        if self.reason is not None:
            return UNSUPPORTED
        kinds = set(self.layers.values())
        if kinds == {FUSED}:
            return FUSED
        if kinds == {REFERENCE}:
            return REFERENCE
        return f"{FUSED} + {REFERENCE}"

    def counts(self) -> dict:
        out: dict = {}
        for v in self.layers.values():
            out[v] = out.get(v, 0) + 1
        return out


def module_path(module: nn.Module, method: str) -> str:
    """The path of one target module under LoRA (``"lora"``) or IA3 (``"ia3"``), from the predicates
    the wrappers dispatch on."""
    from ..layers.base_weight import kernel_weight
    from ..layers import is_linear_like
    from ..layers.ia3_conv import is_ia3_extra
    from ..layers.conv_embedding import is_lora_extra

    if is_linear_like(module):
        # LoraLayer / IA3Layer: the kernels read the weight, or (None: 8-bit) the base runs itself
        return REFERENCE if kernel_weight(module) is None else FUSED
    if method == "lora" and is_lora_extra(module):
        return REFERENCE  # LoraEmbedding / LoraConv (grouped convolutions too): PyTorch ops
    if method == "ia3" and is_ia3_extra(module):
        return REFERENCE  # IA3Conv: PyTorch ops
    return UNSUPPORTED


def layer_paths(model: nn.Module, config) -> Cell:
    """The path every layer ``patch(model, config)`` would adapt takes, without changing the model.

    Args:
        model: a transformers (or any torch) model, possibly with bitsandbytes layers.
        config: anything ``patch`` accepts (peftfast or ``peft`` config, dict, path).

    Returns:
        A :class:`Cell`; ``cell.reason`` holds peftfast's error when ``patch`` would refuse.
    """
    from ..patching import supported_by
    from ..targets import DEFAULT_IA3_TARGETS, model_type, resolve_targets

    try:
        cfg = copy.deepcopy(as_config(config))
        if isinstance(cfg, PROMPT_LEARNING_CONFIGS):
            from ..prompt_learning import check_prompt_learning, is_seq2seq, uses_attention_interface

            check_prompt_learning(model, cfg)
            if isinstance(cfg, PrefixTuningConfig):
                # encoder-decoder models and models that compute attention themselves get the prefix
                # concatenated through the KV cache, as PEFT does
                fused = uses_attention_interface(model) and not is_seq2seq(model)
                return Cell({"<attention>": FUSED if fused else REFERENCE})
            return Cell({"<embeddings>": REFERENCE})
        if isinstance(cfg, IA3Config) and cfg.target_modules is None and model_type(model) in DEFAULT_IA3_TARGETS:
            cfg.target_modules, ff = DEFAULT_IA3_TARGETS[model_type(model)]
            if cfg.feedforward_modules is None:
                cfg.feedforward_modules = ff
        is_lora = isinstance(cfg, LoraConfig)
        names = resolve_targets(model, cfg, supported_by(cfg))
    except ConfigError as e:
        return Cell({}, reason=str(e))
    layers = {n: module_path(model.get_submodule(n), "lora" if is_lora else "ia3") for n in names}
    bad = [n for n, p in layers.items() if p == UNSUPPORTED]
    if bad:
        return Cell(layers, reason=f"peftfast cannot wrap {bad[:3]}")
    return Cell(layers)


def coverage_matrix(families=None, methods=METHODS) -> dict:
    """``{(family, method): Cell}`` for the tiny families (4-bit cells need bitsandbytes)."""
    out = {}
    for f in families or FAMILIES:
        dense = build_model(f) if any(m != "lora-4bit" for m in methods) else None
        for m in methods:  # layer_paths never changes the model: one build serves every dense cell
            model = build_base(f, m) if m == "lora-4bit" else dense
            out[(f, m)] = layer_paths(model, method_config(f, m))
    return out


# ----------------------------------------------------------------------------------------------------
# The README table
# ----------------------------------------------------------------------------------------------------


def _cell_text(name: str, method: str, cell: Cell, notes: dict) -> str:
    if (name, method) in PEFT_UNSUPPORTED:
        return "n/a (PEFT)"
    if cell.reason is not None:
        reason = cell.reason.split(";")[0].rstrip(".")
        number = notes.setdefault(reason, len(notes) + 1)
        return f"**not yet** [{number}]"
    if cell.path == FUSED:
        return "fused"
    if cell.path == REFERENCE:
        return "reference"
    c = cell.counts()
    return f"fused {c.get(FUSED, 0)} / reference {c.get(REFERENCE, 0)}"


def markdown_table(matrix: Optional[dict] = None) -> str:
    """The README's coverage table (family x method), computed from :func:`coverage_matrix`."""
    matrix = matrix if matrix is not None else coverage_matrix()
    lines = ["| task | family | " + " | ".join(METHOD_TITLES[m] for m in METHODS) + " |",
             "|---|---|" + "---|" * len(METHODS)]
    notes: dict = {}
    for name, fam in FAMILIES.items():
        cells = [_cell_text(name, m, matrix[(name, m)], notes) for m in METHODS]
        lines.append("| " + " | ".join([task_title(name), fam.label] + cells) + " |")
    lines += [
        "",
        "- **fused**: the Triton kernels for CUDA tensors (LoRA/DoRA/IA3 on `nn.Linear`, transformers `Conv1D` and "
        "bitsandbytes `Linear4bit`; the prefix-attention kernel), their PyTorch references elsewhere. "
        "**reference**: PyTorch ops by design (LoRA/DoRA on embeddings and convolutions, LoRA on "
        "`nn.MultiheadAttention`, IA3 on convolutions, prompt tuning, prefix tuning on "
        "encoder-decoder models and on models that compute attention themselves, bitsandbytes 8-bit bases). **n/a (PEFT)**: Hugging Face PEFT cannot do it either (`PEFT_UNSUPPORTED` in "
        "`peftfast/devtools/coverage.py`, checked against PEFT by the tests).",
        "- Every supported cell is checked against PEFT on a tiny random model (logits, then training steps with "
        "the same losses and adapter weights) by `tests/test_coverage_matrix.py`; **not yet** cells are strict "
        "xfails there. LoRA targets `all-linear`; IA3 the family default (explicit modules where peftfast has none).",
    ]
    for reason, number in notes.items():
        lines.append(f"- [{number}] {reason}.")
    for family, why in NOT_IN_MATRIX.items():
        lines.append(f"- Not in the matrix: {family}, which {why}.")
    lines += ["", f"Regenerate with `{REGENERATE}` (the tests fail when this table is stale)."]
    return "\n".join(lines)


def readme_block(text: str) -> Optional[str]:
    """The text between the README's coverage markers (None when they are missing)."""
    if README_START not in text or README_END not in text:
        return None
    return text.split(README_START, 1)[1].split(README_END, 1)[0].strip("\n")


def write_readme(path: str, table: str) -> None:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if readme_block(text) is None:
        raise SystemExit(f"{path} has no {README_START} ... {README_END} block")
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    from ..fileio import replace_atomically

    with replace_atomically(path, text=True) as f:  # an interrupted rewrite must not truncate the README
        f.write(f"{head}{README_START}\n{table}\n{README_END}{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m peftfast.devtools.coverage", description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print the README coverage table (the default)")
    parser.add_argument("--write-readme", nargs="?", const="README.md", metavar="PATH",
                        help="rewrite the coverage block of README.md (or PATH)")
    args = parser.parse_args(argv)
    table = markdown_table()
    if args.write_readme:
        write_readme(args.write_readme, table)
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
