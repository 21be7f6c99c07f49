"""Hugging Face ``Trainer`` with a peftfast-patched model.

A patched model with a dense base trains under a plain ``transformers.Trainer``: the Trainer saves the
whole model (``model.safetensors``, base weights included, under the patched names such as
``q_proj.base_layer.weight``) and ``resume_from_checkpoint`` restores it exactly. Two things it does not
do by itself, which this module adds:

* :class:`AdapterCheckpointCallback` writes the adapter in PEFT's format into every
  ``checkpoint-<step>`` directory the Trainer makes (and into ``output_dir`` at the end), so each
  checkpoint is also an adapter that ``peftfast.load_adapter`` / ``PeftModel.from_pretrained`` loads.
* :class:`PeftfastTrainer` saves *only* the adapter as the model part of its checkpoints and restores
  it on ``resume_from_checkpoint``; it is also what makes a **4-bit (QLoRA) base** trainable under the
  Trainer, which otherwise refuses quantized models that are not ``peft.PeftModel`` objects.
* :func:`peftfast_trainer` gives the same behaviour to any ``Trainer`` subclass, e.g. TRL's
  ``SFTTrainer`` (whose ``peft_config`` argument expects a ``peft.PeftConfig``: patch the model
  with peftfast first and pass no ``peft_config``).

Example:
    >>> trainer = PeftfastTrainer(model=patched_model, args=args, train_dataset=ds)  # doctest: +SKIP
    >>> trainer.train(resume_from_checkpoint=True)  # doctest: +SKIP
    >>> SFT = peftfast_trainer(trl.SFTTrainer)  # doctest: +SKIP
    >>> SFT(model=patched_model, args=trl.SFTConfig(...), train_dataset=ds, processing_class=tok).train()  # doctest: +SKIP
"""
from __future__ import annotations

import os

import torch
from transformers import Trainer, TrainerCallback

from .config import ConfigError


class AdapterCheckpointCallback(TrainerCallback):
    """Save the adapter (PEFT format) into each Trainer checkpoint directory and into ``output_dir`` at the end."""

    def __init__(self, adapter_name: str = "default"):
        self.adapter_name = adapter_name

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is not None and state.is_world_process_zero:
            import peftfast

            peftfast.save_adapter(_unwrap(model), os.path.join(args.output_dir, f"checkpoint-{state.global_step}"),
                                  adapter_name=self.adapter_name)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None and state.is_world_process_zero:
            import peftfast

            peftfast.save_adapter(_unwrap(model), args.output_dir, adapter_name=self.adapter_name)
        return control


def _unwrap(model):
    while hasattr(model, "module") and not hasattr(model, "peftfast_state"):  # DDP and similar wrappers
        model = model.module
    return getattr(model, "_orig_mod", model)  # torch.compile


class PeftfastTrainerMixin:
    """Checkpoints that hold the adapter only (PEFT format), and 4-bit bases accepted, for a ``Trainer``
    subclass: put it first in the bases (``class T(PeftfastTrainerMixin, SomeTrainer)``), or use
    :func:`peftfast_trainer`."""

    adapter_name = "default"

    def __init__(self, model=None, *args, **kwargs):
        # transformers (and TRL) refuse a quantized model unless it carries PEFT adapters, which they
        # recognize by this flag (set by transformers' own PEFT integration); lifted right after the check.
        flagged = (model is not None and not isinstance(model, str) and getattr(model, "is_quantized", False)
                   and "_hf_peft_config_loaded" not in vars(model))
        if flagged:
            model._hf_peft_config_loaded = True
        try:
            super().__init__(model, *args, **kwargs)
        finally:
            if flagged:
                del model._hf_peft_config_loaded

    def _save(self, output_dir=None, state_dict=None):
        import peftfast

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        peftfast.save_adapter(_unwrap(self.model), output_dir, adapter_name=self.adapter_name)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        from .checkpoint import WEIGHTS_NAME, adapter_state_dict, read_adapter_weights

        model = _unwrap(model if model is not None else self.model)
        if not os.path.isfile(os.path.join(resume_from_checkpoint, WEIGHTS_NAME)):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = read_adapter_weights(resume_from_checkpoint)
        mine = adapter_state_dict(model, self.adapter_name)
        if set(saved) != set(mine):
            raise ConfigError(f"{resume_from_checkpoint}: its adapter does not match the model's "
                             f"(e.g. {sorted(set(saved) ^ set(mine))[:3]})")
        with torch.no_grad():
            for key, tensor in mine.items():
                tensor.copy_(saved[key].to(tensor.dtype))

    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        if best:
            self._load_from_checkpoint(best)


class PeftfastTrainer(PeftfastTrainerMixin, Trainer):
    """A ``Trainer`` whose checkpoints hold the adapter only (PEFT format), also for 4-bit bases."""


_MIXED: dict = {}


def peftfast_trainer(trainer_cls: type) -> type:
    """``trainer_cls`` (a ``transformers.Trainer`` subclass) with :class:`PeftfastTrainerMixin` mixed in.

    Args:
        trainer_cls: e.g. ``trl.SFTTrainer``.

    Returns:
        A subclass named ``Peftfast<Name>``, one per ``trainer_cls`` (so pickled/compared classes agree).

    Example:
        >>> import trl  # doctest: +SKIP
        >>> trainer = peftfast_trainer(trl.SFTTrainer)(model=patched, args=cfg, train_dataset=ds,
        ...                                             processing_class=tok)  # doctest: +SKIP
    """
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
        raise TypeError(f"peftfast_trainer needs a transformers.Trainer subclass, got {trainer_cls!r}")
    if issubclass(trainer_cls, PeftfastTrainerMixin):
        return trainer_cls
    if trainer_cls not in _MIXED:
        _MIXED[trainer_cls] = type(f"Peftfast{trainer_cls.__name__}", (PeftfastTrainerMixin, trainer_cls),
                                   {"__module__": __name__, "__doc__": PeftfastTrainerMixin.__doc__})
    return _MIXED[trainer_cls]


__all__ = ["AdapterCheckpointCallback", "PeftfastTrainer", "PeftfastTrainerMixin", "peftfast_trainer"]
