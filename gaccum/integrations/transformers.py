"""Hugging Face Trainer: ``TrainingArguments`` from a plan, and a callback that reports each window.

``plan_training_arguments(model, args, train_dataset, data_collator, target_bs=256)`` probes the
model with the dataset's *longest* samples, through the collator (memory grows with length), and
returns new ``TrainingArguments`` (``return_plan=True``: and the plan) with ``per_device_train_batch_size`` and
``gradient_accumulation_steps`` set. The Trainer batches at one fixed size, so the micro-batch is the
largest size that fits *and divides* the per-device target when that loses little, else the plan's
largest with a few samples more per step (said in ``plan.notes``). ``GaccumTrainerCallback`` records,
per optimizer step, whether it was skipped for inf/NaN (Accelerate's ``step_was_skipped``) and the
window's token count (with ``include_num_input_tokens_seen``; the arguments count non-padding tokens).

The Trainer normalises a window's loss by ``num_items_in_batch``, which it counts on shifted labels only
when the model's ``loss_type`` says its loss shifts them. A causal LM built from a config (GPT-2's
``GPT2LMHeadModel``, ``loss_type`` None) is counted on unshifted labels, one token per sequence too
many, and its gradient comes out 4-5% small: :func:`causal_lm_token_count` sets ``loss_type`` so the
Trainer counts what the loss averages over; ``plan_training_arguments`` calls it and says so.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Optional

import torch

from ..planner import plan as make_plan
from ._common import fixed_size_window


def _length(example: Any) -> int:
    if isinstance(example, dict):
        ids = example.get("input_ids", next(iter(example.values())))
        return len(ids)
    return len(example)


def causal_lm_token_count(model: torch.nn.Module) -> bool:
    """Make the Trainer count a causal LM's tokens on shifted labels; True when ``loss_type`` was set.

    Only for a model whose loss is transformers' causal-LM loss (which shifts labels) and whose
    ``loss_type`` is unset; encoder-decoder models and models with another loss are left alone.
    """
    from transformers.loss.loss_utils import LOSS_MAPPING

    inner = model
    if getattr(inner, "loss_type", "unset") is not None or getattr(getattr(inner, "config", None),
                                                                     "is_encoder_decoder", False):
        return False
    try:
        loss = inner.loss_function
    except AttributeError:
        return False
    if loss is not LOSS_MAPPING["ForCausalLM"]:
        return False
    inner.loss_type = "ForCausalLM"
    return True


def _scan(train_dataset: Any, longest: int) -> list:
    """The first ``longest`` examples: by index, or from a stream (nothing calls len() on a stream)."""
    if hasattr(train_dataset, "__len__") and hasattr(train_dataset, "__getitem__"):
        return [train_dataset[i] for i in range(min(len(train_dataset), longest))]
    return list(itertools.islice(iter(train_dataset), longest))


def plan_training_arguments(model: torch.nn.Module, args: Any, train_dataset: Any,
                            data_collator: Optional[Callable[[list], Any]] = None, *, target_bs: int,
                            memory_limit: Optional[int | str] = None, headroom: float | int | str = 0.05,
                            longest: int = 4096, return_plan: bool = False, eval_dataset: Any = None,
                            **plan_kwargs: Any) -> Any:
    """``TrainingArguments`` with the batch size and accumulation from a plan (``args`` is untouched);
    with ``return_plan=True``, ``(arguments, plan)``. With ``eval_dataset``, ``per_device_eval_batch_size``
    comes from a plan of its own (``mode="eval"``: forward only), so evaluation never shrinks training.

    ``target_bs`` is the global batch (all devices). ``longest``: how many samples are scanned for
    the longest ones (the whole dataset when it is smaller).
    """
    try:
        from transformers import default_data_collator
    except ImportError as exc:  # pragma: no cover - the extra is missing
        raise ImportError("gaccum.integrations.transformers needs transformers: pip install gaccum[integrations]") from exc
    collate = data_collator or default_data_collator
    sample = _longest_first(train_dataset, longest, collate, next(model.parameters()).device)

    def loss_fn(m: torch.nn.Module, batch: Any) -> torch.Tensor:
        return m(**batch).loss

    amp = "bf16" if getattr(args, "bf16", False) else ("fp16" if getattr(args, "fp16", False) else None)
    p = make_plan(model, target_bs=target_bs, sample=sample, loss_fn=loss_fn, amp=amp, memory_limit=memory_limit,
                  headroom=headroom, **plan_kwargs)
    micro, steps = fixed_size_window(p, "the Trainer")
    if causal_lm_token_count(model):
        p.notes.append("the model's loss_type was unset: set to 'ForCausalLM' so the Trainer counts "
                       "num_items_in_batch on shifted labels (one token per sequence fewer)")
    changes: dict[str, Any] = {"per_device_train_batch_size": micro, "gradient_accumulation_steps": steps}
    if getattr(args, "include_num_input_tokens_seen", "no") in (True, "all"):
        changes["include_num_input_tokens_seen"] = "non_padding"  # GaccumTrainerCallback reports real tokens
    if eval_dataset is not None:
        ev = make_plan(model, target_bs=target_bs, mode="eval", amp=amp, memory_limit=memory_limit, headroom=headroom,
                       sample=_longest_first(eval_dataset, longest, collate, next(model.parameters()).device),
                       loss_fn=lambda m, batch: m(**batch), **plan_kwargs)
        changes["per_device_eval_batch_size"] = min(ev.max_micro_batch, target_bs // ev.world_size)
        p.notes.append(f"eval batch {changes['per_device_eval_batch_size']} per device (forward only, planned apart)")
    new = dataclasses.replace(args, **changes)
    return (new, p) if return_plan else new


def _longest_first(dataset: Any, longest: int, collate: Callable[[list], Any], device: torch.device) -> Callable:
    """``sample(b)``: b of the dataset's longest examples (of the first ``longest``), collated, on the device."""
    examples = sorted(_scan(dataset, longest), key=_length, reverse=True)
    if not examples:
        raise ValueError("gaccum: the dataset is empty; nothing to plan with")

    def sample(b: int) -> Any:
        batch = collate([examples[i % len(examples)] for i in range(b)])
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    return sample


try:
    from transformers import TrainerCallback as _Base
except ImportError:  # pragma: no cover - gaccum never needs transformers itself
    _Base = object  # type: ignore[misc,assignment]


class GaccumTrainerCallback(_Base):  # type: ignore[misc,valid-type]
    """Per optimizer step: ``{"step", "skipped", "window_tokens"}`` in ``records`` (and in the logs)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self._tokens_before = 0

    def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> Any:
        seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        self.records.append({
            "step": state.global_step,
            "skipped": bool(getattr(optimizer, "step_was_skipped", False)),
            "window_tokens": (seen - self._tokens_before) if seen else None,
        })
        self._tokens_before = seen
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict] = None, **kwargs: Any) -> Any:
        """Into the entry the Trainer has just added to ``state.log_history`` (and the logs dict)."""
        if not self.records:
            return control
        extra = {"gaccum_skipped_steps": sum(r["skipped"] for r in self.records)}
        if self.records[-1]["window_tokens"] is not None:
            extra["gaccum_window_tokens"] = self.records[-1]["window_tokens"]
        if logs is not None:
            logs.update(extra)
        if state.log_history:
            state.log_history[-1].update(extra)
        return control
