"""Lightning: ``GaccumPlanner``, a callback in the spirit of Lightning's ``BatchSizeFinder``.

At fit start it plans from the LightningModule itself: its ``training_step`` is the loss (``self.log``
is silenced while probing), a batch from the datamodule's or module's ``train_dataloader`` (its
dataset and collate function) is the sample, and the trainer's optimizer is the optimizer. It then
sets the micro-batch where Lightning's finder would (the ``batch_size`` attribute of the module or
datamodule), ``trainer.accumulate_grad_batches``, and optionally the learning rate by rule, and
prints the plan table. Lightning batches at one size, so the micro-batch is the largest that fits
and divides the target when that loses little (``gaccum.integrations._common``).

Lightning's partial last window: when an epoch's batches do not fill the last window, Lightning
still divides each of its losses by ``accumulate_grad_batches`` (Lightning #19987), so that window's
step is smaller than a full one by the missing fraction. Use ``drop_last=True`` in the dataloader, or
an epoch length that is a multiple of the window, for every step to be the planned batch's mean.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch

from ..planner import Plan, plan as make_plan
from ..schedule import rescale_lr
from ._common import fixed_size_window

try:
    from lightning.pytorch import Callback as _Base
except ImportError:  # pragma: no cover - gaccum itself never needs lightning
    _Base = object  # type: ignore[misc,assignment]


@contextlib.contextmanager
def _quiet_logging(module: Any) -> Iterator[None]:
    """``self.log`` outside Lightning's loop raises; while probing it logs nothing."""
    saved = {name: module.__dict__.get(name) for name in ("log", "log_dict")}
    module.log = lambda *a, **k: None
    module.log_dict = lambda *a, **k: None
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del module.__dict__[name]
            else:
                module.__dict__[name] = value


class GaccumPlanner(_Base):  # type: ignore[misc,valid-type]
    """Plan the micro-batch and accumulation for ``target_bs`` when fit starts; ``self.plan`` keeps it."""

    def __init__(self, target_bs: int, *, memory_limit: Optional[int | str] = None,
                 headroom: float | int | str = 0.05, batch_arg_name: str = "batch_size",
                 lr_rule: Optional[str] = None, base_bs: Optional[int] = None,
                 eval_batch_arg_name: Optional[str] = None, **plan_kwargs: Any) -> None:
        """``eval_batch_arg_name``: the attribute ``val_dataloader()`` reads its batch size from; it is set
        from a plan of its own (``mode="eval"``: ``validation_step`` forward only), apart from training."""
        if lr_rule not in (None, "linear", "sqrt"):
            raise ValueError(f"gaccum: lr_rule must be None, 'linear' or 'sqrt', got {lr_rule!r}")
        self.target_bs, self.memory_limit, self.headroom = target_bs, memory_limit, headroom
        self.batch_arg_name, self.lr_rule, self.base_bs = batch_arg_name, lr_rule, base_bs
        self.eval_batch_arg_name = eval_batch_arg_name
        self.plan_kwargs = plan_kwargs
        self.plan: Optional[Plan] = None
        self.eval_plan: Optional[Plan] = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_setattr
        from lightning.pytorch.utilities.rank_zero import rank_zero_info

        _check_loaders(trainer, pl_module, self.batch_arg_name)
        source = trainer.datamodule if trainer.datamodule is not None else pl_module
        loader = source.train_dataloader()
        device = pl_module.device
        target, size = self.target_bs, _dataset_size(loader.dataset)
        if size is not None and size < target:
            target = size  # as Lightning's finder: nothing larger than the data can be a batch

        sample = _sampler(loader, pl_module, device)

        def loss_fn(module: Any, batch: Any) -> torch.Tensor:
            out = module.training_step(batch, 0)
            return out["loss"] if isinstance(out, dict) else out

        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        before = lightning_getattr(pl_module, self.batch_arg_name)
        with _quiet_logging(pl_module):
            p = make_plan(pl_module, target_bs=target, sample=sample, loss_fn=loss_fn, optimizer=optimizer,
                          memory_limit=self.memory_limit, headroom=self.headroom, **self.plan_kwargs)
        if target < self.target_bs:
            p.notes.append(f"the dataset holds {target} samples, fewer than target_bs={self.target_bs}: planned "
                           f"for {target}")
        micro, steps = fixed_size_window(p, "Lightning")
        lightning_setattr(pl_module, self.batch_arg_name, micro)
        trainer.accumulate_grad_batches = steps
        if self.lr_rule is not None and optimizer is not None:
            self._scale_lr(trainer, optimizer, p, self.base_bs or before)
        self.plan = p
        if self.eval_batch_arg_name is not None:
            self._plan_eval(pl_module, source, device, target)
        rank_zero_info(f"{p}\ngaccum: {self.batch_arg_name}={micro}, accumulate_grad_batches={steps}")

    def _plan_eval(self, pl_module: Any, source: Any, device: torch.device, target: int) -> None:
        from lightning.pytorch.utilities.parsing import lightning_hasattr, lightning_setattr

        name = self.eval_batch_arg_name
        if not lightning_hasattr(pl_module, name):
            raise ValueError(f"gaccum: GaccumPlanner(eval_batch_arg_name={name!r}) sets `{name}` on the module or "
                             "datamodule, and neither has it; add it and read it in val_dataloader()")
        loader = source.val_dataloader()
        with _quiet_logging(pl_module):
            ev = make_plan(pl_module, target_bs=target, mode="eval", sample=_sampler(loader, pl_module, device),
                           loss_fn=lambda m, batch: m.validation_step(batch, 0), memory_limit=self.memory_limit,
                           headroom=self.headroom, **self.plan_kwargs)
        lightning_setattr(pl_module, name, ev.max_micro_batch)
        self.eval_plan = ev


    def _scale_lr(self, trainer: Any, optimizer: Any, p: Plan, base: Optional[int]) -> None:
        """The LR by rule, everywhere torch keeps it: the param groups and each scheduler's base_lrs."""
        factor = p.scale_lr(1.0, base, self.lr_rule) if base else 1.0
        schedulers = [c.scheduler for c in getattr(trainer, "lr_scheduler_configs", [])
                      if getattr(c.scheduler, "optimizer", None) is optimizer]
        rescale_lr(optimizer, schedulers[0] if schedulers else None, factor)
        for extra in schedulers[1:]:
            extra.base_lrs = [lr * factor for lr in extra.base_lrs]
        p.notes.append(f"learning rate x {factor:.4g} ({self.lr_rule} rule from a batch of {base})")


def _sampler(loader: Any, pl_module: Any, device: torch.device) -> Any:
    """``sample(b)``: the first b samples of the loader's dataset, through its collate function, on the device."""

    def sample(b: int) -> Any:
        batch = next(iter(torch.utils.data.DataLoader(loader.dataset, batch_size=b, collate_fn=loader.collate_fn)))
        return pl_module.transfer_batch_to_device(batch, device, 0)

    return sample


def _dataset_size(dataset: Any) -> Optional[int]:
    try:
        return len(dataset)
    except TypeError:  # a stream: its length is unknown
        return None


def _check_loaders(trainer: Any, pl_module: Any, name: str) -> None:
    from lightning.pytorch.utilities.parsing import lightning_hasattr

    source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
    if source is not None and not source.is_module():  # Lightning's own test, as its BatchSizeFinder makes it
        raise ValueError(
            "gaccum: GaccumPlanner sets the batch size the module or datamodule's train_dataloader() reads, but "
            "this fit() was given its dataloader directly, which would keep training at its own batch size. "
            f"Build the loader in train_dataloader() from self.{name} (or a LightningDataModule), or leave "
            "GaccumPlanner out")
    if not lightning_hasattr(pl_module, name):
        raise ValueError(f"gaccum: GaccumPlanner sets `{name}` on the module or datamodule, and "
                         "neither has it; add it and read it in train_dataloader()")
