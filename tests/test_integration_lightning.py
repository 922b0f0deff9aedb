"""Lightning, for real on CPU: GaccumPlanner plans at fit start and Lightning trains under the budget."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gaccum.accumulation import MemoryBudget

L = pytest.importorskip("lightning")
from gaccum.integrations.lightning import GaccumPlanner  # noqa: E402


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))
        self.batch_size = 4
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(2048, 64, generator=g), torch.randint(0, 10, (2048,), generator=g))

    def training_step(self, batch, _):
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.log("train_loss", loss)  # silenced while probing, logged while training
        return loss

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, drop_last=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class UnderBudget(L.Callback):
    """From the first training batch on (after the plan), every tensor counts against the budget."""

    def __init__(self, budget):
        self.budget, self.meter = budget, None

    def on_train_start(self, trainer, module):
        self.meter = MemoryBudget(self.budget, module, trainer.optimizers[0]).__enter__()


def test_gaccum_planner_sets_batch_size_and_accumulation_and_trains_under_the_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("GACCUM_CACHE_DIR", str(tmp_path / "cache"))
    module = Module()
    planner = GaccumPlanner(256, memory_limit="2MiB", headroom=0, lr_rule="linear", base_bs=256, cache=False)
    under = UnderBudget(2 << 20)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, callbacks=[planner, under], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    try:
        trainer.fit(module)  # a micro-batch over the budget would raise torch.OutOfMemoryError here
    finally:
        if under.meter is not None:
            under.meter.__exit__(None, None, None)
    plan = planner.plan
    assert plan is not None and plan.max_micro_batch < 256 and plan.budget == 2 << 20
    assert under.meter.peak <= plan.budget
    assert module.batch_size <= plan.max_micro_batch and 256 % module.batch_size == 0
    assert trainer.accumulate_grad_batches * module.batch_size == 256
    assert trainer.global_step == 2
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3)  # linear rule from 256 to 256


def test_a_module_without_the_batch_size_attribute_is_named(tmp_path):
    module = Module()
    del module.batch_size
    trainer = L.Trainer(accelerator="cpu", max_steps=1, callbacks=[GaccumPlanner(64, memory_limit="2MiB")],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match="sets `batch_size`"):
        trainer.fit(module)


def _trainer(tmp_path, planner, max_steps=1):
    return L.Trainer(accelerator="cpu", max_steps=max_steps, callbacks=[planner], logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))


def test_a_dataset_smaller_than_the_target_is_planned_for_what_it_holds(tmp_path):
    module = Module()
    module.data = TensorDataset(module.data.tensors[0][:48], module.data.tensors[1][:48])
    planner = GaccumPlanner(256, memory_limit="64MiB", headroom=0, cache=False)
    trainer = _trainer(tmp_path, planner)
    trainer.fit(module)  # was: an error about sample(), a function the user never wrote
    assert planner.plan.effective_batch_size == 48 and any("48 samples" in n for n in planner.plan.notes)
    assert module.batch_size * trainer.accumulate_grad_batches == 48


def test_a_dataloader_passed_to_fit_is_refused_with_the_way_out(tmp_path):
    module = Module()
    loader = DataLoader(module.data, batch_size=32)
    with pytest.raises(ValueError, match="given its dataloader directly"):
        _trainer(tmp_path, GaccumPlanner(64, memory_limit="64MiB", cache=False)).fit(module, train_dataloaders=loader)


class WithLambdaLR(Module):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)}


def test_the_lr_rule_rescales_a_schedulers_base_lrs_too(tmp_path):
    module = WithLambdaLR()
    planner = GaccumPlanner(256, memory_limit="64MiB", headroom=0, lr_rule="linear", base_bs=64, cache=False)
    trainer = _trainer(tmp_path, planner, max_steps=3)
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, *_):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer.callbacks.append(Record())
    trainer.fit(module)
    # was [0.4, 0.1, 0.1, ...]: the LambdaLR recomputed the LR from its unscaled base_lrs
    assert lrs and all(lr == pytest.approx(0.4) for lr in lrs)


class WithValidation(Module):
    def __init__(self):
        super().__init__()
        self.eval_batch_size = 4

    def validation_step(self, batch, _):
        self.log("val_loss", F.cross_entropy(self.net(batch[0]), batch[1]))

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=self.eval_batch_size)


def test_the_eval_batch_is_planned_apart_and_lightning_validates_with_it(tmp_path):
    module = WithValidation()
    planner = GaccumPlanner(256, memory_limit="2MiB", headroom=0, eval_batch_arg_name="eval_batch_size",
                            cache=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, callbacks=[planner], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module)
    assert planner.eval_plan.mode == "eval" and module.eval_batch_size == planner.eval_plan.max_micro_batch
    assert module.eval_batch_size > module.batch_size  # forward only: more fits than in training
