"""A patched model in the training stacks people use: HF Trainer (dense and 4-bit bases, checkpoint +
resume), TRL's SFTTrainer (when installed), gradient checkpointing, bf16 autocast, torch.compile."""
import os

import pytest
import torch
from torch.utils.data import Dataset
from transformers import TrainingArguments
from transformers.utils import logging as hf_logging

import peftfast
from tiny import tiny_llama

hf_logging.set_verbosity_error()


class Tokens(Dataset):
    def __init__(self, n=32, seq=16, vocab=64):
        self.x = torch.randint(1, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _args(out, **kw):
    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, save_steps=2,
                logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
                disable_tqdm=True, save_safetensors=True)
    base.update(kw)
    try:
        return TrainingArguments(**base)
    except TypeError:  # save_safetensors was removed in newer transformers (always on)
        base.pop("save_safetensors")
        return TrainingArguments(**base)


def _lora(model):
    return peftfast.patch(model, peftfast.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


def _adapter(model):
    return {k: v.detach().clone() for k, v in peftfast.adapter_state_dict(model).items()}


def _base(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


def test_trainer_trains_and_resumes_dense_base(tmp_path):
    from transformers import Trainer

    from peftfast.integrations import AdapterCheckpointCallback

    model = _lora(tiny_llama())
    base0, adapter0 = _base(model), _adapter(model)
    trainer = Trainer(model=model, args=_args(tmp_path / "a"), train_dataset=Tokens(),
                      callbacks=[AdapterCheckpointCallback()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.equal(v, _base(model)[k]) for k, v in base0.items())  # the base is frozen
    changed = _adapter(model)
    assert any(not torch.equal(changed[k], adapter0[k]) for k in adapter0)  # B starts at 0 and moves

    # What a plain Trainer saves for a non-PeftModel: the whole model (base under patched names) ...
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert (ckpt / "model.safetensors").is_file()
    # ... and the callback adds the adapter in PEFT's format, loadable into a fresh base
    fresh = peftfast.load_adapter(tiny_llama(), str(tmp_path / "a"))
    ids = Tokens().x[:2]
    model.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(ids).logits, model(ids).logits, atol=1e-5)

    # resume_from_checkpoint with a plain Trainer: same final adapter as the uninterrupted run
    again = _lora(tiny_llama())
    Trainer(model=again, args=_args(tmp_path / "b"), train_dataset=Tokens()).train(resume_from_checkpoint=str(ckpt))
    resumed = _adapter(again)
    for k in changed:
        assert torch.allclose(resumed[k], changed[k], atol=1e-6, rtol=0), k


def test_peftfast_trainer_qlora_saves_adapter_only_and_resumes(tmp_path):
    from transformers import AutoModelForCausalLM, Trainer

    from peftfast.cli.basemodel import quant_config
    from peftfast.integrations import PeftfastTrainer

    tiny_llama().save_pretrained(tmp_path / "base")

    def make():
        m = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), quantization_config=quant_config(torch.float32),
                                                 device_map="cpu")
        torch.manual_seed(0)
        return _lora(m)

    model = make()
    with pytest.raises(ValueError, match="purely quantized"):  # why PeftfastTrainer exists
        Trainer(model=model, args=_args(tmp_path / "x"), train_dataset=Tokens())
    trainer = PeftfastTrainer(model=model, args=_args(tmp_path / "a"), train_dataset=Tokens())
    assert "_hf_peft_config_loaded" not in vars(model)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    ckpt = tmp_path / "a" / "checkpoint-2"
    names = set(os.listdir(ckpt))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names and "model.safetensors" not in names
    final = _adapter(model)

    again = make()
    PeftfastTrainer(model=again, args=_args(tmp_path / "b"), train_dataset=Tokens()).train(
        resume_from_checkpoint=str(ckpt))
    resumed = _adapter(again)
    for k in final:
        assert torch.allclose(resumed[k], final[k], atol=1e-6, rtol=0), k


# --------------------------------------------------------------------------------------------------
# TRL's SFTTrainer (runs where TRL is installed: it is in the dev extra)
# --------------------------------------------------------------------------------------------------


def _sft_config(trl, out, **kw):
    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2, max_length=64,
                report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", seed=0, data_seed=0,
                dataloader_num_workers=0, disable_tqdm=True)
    base.update(kw)
    return trl.SFTConfig(**base)


def _corpus_lines(n=16):
    from pathlib import Path

    text = (Path(peftfast.__file__).parent / "data" / "corpus.txt").read_text()
    return [line for line in text.splitlines() if line.strip()][:n]


def test_trl_sft_trainer_text_dataset_saves_a_peft_adapter(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from peft import PeftModel

    from peftfast.integrations import AdapterCheckpointCallback
    from tiny import byte_chat_tokenizer, tiny_llama_for

    tok = byte_chat_tokenizer()
    model = _lora(tiny_llama_for(tok))
    base0, adapter0 = _base(model), _adapter(model)
    ds = datasets.Dataset.from_dict({"text": _corpus_lines()})
    trainer = trl.SFTTrainer(model=model, args=_sft_config(trl, tmp_path), train_dataset=ds, processing_class=tok,
                             callbacks=[AdapterCheckpointCallback()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.equal(v, _base(model)[k]) for k, v in base0.items())  # the base stays frozen
    assert any(not torch.equal(_adapter(model)[k], adapter0[k]) for k in adapter0)

    # The adapter written at the end is the trained one, and PEFT loads it onto a fresh base with the
    # logits peftfast gives. (The trained model itself is not compared: accelerate leaves its forward
    # wrapped in the bf16 autocast SFTConfig turns on by default.)
    saved = peftfast.checkpoint.read_adapter_weights(str(tmp_path))
    assert saved.keys() == _adapter(model).keys()
    assert all(torch.equal(saved[k], v) for k, v in _adapter(model).items())
    peft_model = PeftModel.from_pretrained(tiny_llama_for(tok), str(tmp_path)).eval()
    ours = peftfast.load_adapter(tiny_llama_for(tok), str(tmp_path)).eval()
    ids = torch.tensor([tok("the cat sat")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(peft_model(ids).logits, ours(ids).logits, atol=1e-5)


def test_trl_sft_trainer_chat_messages(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from tiny import byte_chat_tokenizer, tiny_llama_for

    tok = byte_chat_tokenizer()
    model = _lora(tiny_llama_for(tok))
    adapter0 = _adapter(model)
    rows = [[{"role": "user", "content": f"line {i}?"}, {"role": "assistant", "content": line}]
            for i, line in enumerate(_corpus_lines(8))]
    trainer = trl.SFTTrainer(model=model, args=_sft_config(trl, tmp_path, max_steps=2), processing_class=tok,
                             train_dataset=datasets.Dataset.from_dict({"messages": rows}))
    # TRL rendered the conversations through the tokenizer's chat template
    first = trainer.train_dataset[0]["input_ids"]
    assert tok.decode(first).startswith("<s><|im_start|>user\nline 0?<|im_end|>")
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(_adapter(model)[k], adapter0[k]) for k in adapter0)


def test_trl_sft_trainer_qlora_prompt_completion_and_resume(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from transformers import AutoModelForCausalLM

    from peftfast.cli.basemodel import quant_config
    from peftfast.integrations import peftfast_trainer
    from tiny import byte_chat_tokenizer, tiny_llama_for

    tok = byte_chat_tokenizer()
    tiny_llama_for(tok).save_pretrained(tmp_path / "base")

    def make():
        m = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), quantization_config=quant_config(torch.float32),
                                                 device_map="cpu")
        torch.manual_seed(0)
        return _lora(m)

    lines = _corpus_lines()
    ds = datasets.Dataset.from_dict({"prompt": [f"Q{i}: " for i in range(len(lines))], "completion": lines})
    model = make()
    assert model.is_loaded_in_4bit
    with pytest.raises(ValueError, match="purely quantized"):  # why peftfast_trainer exists
        trl.SFTTrainer(model=model, args=_sft_config(trl, tmp_path / "x"), train_dataset=ds, processing_class=tok)

    SFT = peftfast_trainer(trl.SFTTrainer)
    assert peftfast_trainer(trl.SFTTrainer) is SFT and issubclass(SFT, trl.SFTTrainer)
    args = dict(save_strategy="steps", save_steps=2)
    trainer = SFT(model=model, args=_sft_config(trl, tmp_path / "a", **args), train_dataset=ds, processing_class=tok)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    ckpt = tmp_path / "a" / "checkpoint-2"
    names = set(os.listdir(ckpt))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names and "model.safetensors" not in names
    final = _adapter(model)
    assert any(not torch.equal(final[k], torch.zeros_like(final[k])) for k in final if "lora_B" in k)

    again = make()
    SFT(model=again, args=_sft_config(trl, tmp_path / "b", **args), train_dataset=ds,
        processing_class=tok).train(resume_from_checkpoint=str(ckpt))
    resumed = _adapter(again)
    for k in final:
        assert torch.allclose(resumed[k], final[k], atol=1e-6, rtol=0), k


def test_peftfast_trainer_refuses_what_is_not_a_trainer():
    from peftfast.integrations import PeftfastTrainer, peftfast_trainer

    with pytest.raises(TypeError, match="Trainer subclass"):
        peftfast_trainer(object)
    assert peftfast_trainer(PeftfastTrainer) is PeftfastTrainer


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_same_loss_and_grads(reentrant):
    model = peftfast.patch(tiny_llama(), peftfast.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                             init_lora_weights=False))
    model.train()
    ids = Tokens().x[:4]
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    assert model.is_gradient_checkpointing
    loss, grads = _loss_and_grads(model, ids)
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for k in grads:
        assert torch.allclose(grads[k], ref_grads[k], atol=1e-6, rtol=1e-5), k
    # the base still gets no gradient
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_bf16_autocast_cpu():
    model = _lora(tiny_llama())
    model.train()
    ids = Tokens().x[:4]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype in (torch.bfloat16, torch.float32)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert all(g.dtype == torch.float32 for g in grads)  # adapter params stay fp32 under autocast


def test_torch_compile_matches_eager():
    # ~30 s of Inductor compilation on a 2-core CPU; the graph is the whole patched Llama forward
    model = peftfast.patch(tiny_llama(), peftfast.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                             init_lora_weights=False))
    ids = Tokens().x[:2]
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model)(ids).logits
    assert torch.allclose(compiled, eager, atol=1e-5, rtol=1e-5), (compiled - eager).abs().max()
