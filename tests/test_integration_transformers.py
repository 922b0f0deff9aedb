"""The Hugging Face Trainer, for real on CPU: TrainingArguments from a plan (probed with the longest
samples through the collator), and the callback that reports each window."""

import copy
import dataclasses

import pytest
import torch

import gaccum
from gaccum.accumulation import MemoryBudget

transformers = pytest.importorskip("transformers")
from gaccum.integrations.transformers import GaccumTrainerCallback, plan_training_arguments  # noqa: E402

VOCAB = 64


def tiny_gpt2(dropout=0.1):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def dataset(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 48, (n,), generator=g).tolist()
    if n > 17:
        lengths[17] = 64  # one long sample: the plan must probe with it
    return [{"input_ids": torch.randint(0, VOCAB, (n_,), generator=g).tolist()} for n_ in lengths]


def collate(items):
    longest = max(len(it["input_ids"]) for it in items)
    ids = torch.zeros(len(items), longest, dtype=torch.long)
    mask = torch.zeros(len(items), longest, dtype=torch.long)
    for i, it in enumerate(items):
        ids[i, : len(it["input_ids"])] = torch.tensor(it["input_ids"])
        mask[i, : len(it["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def test_plan_training_arguments_probes_the_longest_and_the_trainer_runs_under_the_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("GACCUM_CACHE_DIR", str(tmp_path / "cache"))
    model, data = tiny_gpt2(), dataset()
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_steps=2,
                                          logging_steps=1, save_strategy="no", learning_rate=1e-3,
                                          include_num_input_tokens_seen=True, dataloader_drop_last=True)
    seen = []
    original = collate

    def spying(items):
        seen.append(max(len(it["input_ids"]) for it in items))
        return original(items)

    new_args, plan = plan_training_arguments(model, args, data, spying, target_bs=32, memory_limit="6MiB",
                                             headroom=0, cache=False, return_plan=True)
    assert isinstance(plan_training_arguments(model, args, data, collate, target_bs=32, memory_limit="6MiB",
                                              headroom=0, cache=False), transformers.TrainingArguments)
    assert max(seen) == 64  # probed with the longest sample, through the collator
    assert plan.max_micro_batch < 32  # the budget makes accumulation necessary
    micro, steps = new_args.per_device_train_batch_size, new_args.gradient_accumulation_steps
    assert micro <= plan.max_micro_batch and micro * steps >= 32 and 32 % micro == 0
    assert args.per_device_train_batch_size == 8 and args.gradient_accumulation_steps == 1  # untouched

    callback = GaccumTrainerCallback()
    trainer = transformers.Trainer(model=model, args=new_args, train_dataset=data, data_collator=collate,
                                   callbacks=[callback])
    with MemoryBudget(plan.budget, model, torch.optim.SGD(model.parameters(), lr=0)):
        trainer.train()  # any micro-batch over the plan's budget raises here
    assert trainer.state.global_step == 2
    assert [r["skipped"] for r in callback.records] == [False, False]
    assert all(r["window_tokens"] > 0 for r in callback.records)
    assert any("gaccum_window_tokens" in h for h in trainer.state.log_history)


def _true_token_mean_update(model, data, lr):
    """One SGD step on the mean cross-entropy over every predicted (shifted, non-padding) token, by hand."""
    batch = collate(data)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels.reshape(-1),
                                               ignore_index=-100, reduction="sum")
    (losses / labels.ne(-100).sum()).backward()
    return [-lr * p.grad for p in model.parameters()]


@pytest.mark.parametrize("fix", [True, False])
def test_the_trainer_steps_on_the_true_token_mean_of_a_causal_lm_built_from_a_config(tmp_path, fix):
    data = dataset(n=8, seed=3)
    model = tiny_gpt2(dropout=0.0).double()  # the reference below runs the same forward
    ref = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_steps=1,
                                          save_strategy="no", learning_rate=0.1, optim="sgd", weight_decay=0.0,
                                          lr_scheduler_type="constant", max_grad_norm=0.0, warmup_steps=0)
    if fix:
        args, plan = plan_training_arguments(model, args, data, collate, target_bs=8, memory_limit="64MiB",
                                             headroom=0, cache=False, return_plan=True)
        assert model.loss_type == "ForCausalLM" and any("shifted labels" in n for n in plan.notes)
    else:
        args = dataclasses.replace(args, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=collate).train()
    want = _true_token_mean_update(ref, data, 0.1)
    got = [a.detach() - b for a, b in zip(model.parameters(), before)]
    err = max(float((g - w).norm() / w.norm()) for g, w in zip(got, want) if w.norm() > 0)
    if fix:
        assert err < 1e-6  # transformers' loss computes in float32: 4e-8 here
    else:  # what the Trainer does on its own: the gradient 4% below the token mean (0.041 here)
        assert err > 0.03


def test_the_callback_counts_real_tokens_not_padding(tmp_path):
    data = dataset(n=16, seed=4)
    model = tiny_gpt2()
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_steps=1,
                                          save_strategy="no", include_num_input_tokens_seen=True)
    args = plan_training_arguments(model, args, data, collate, target_bs=16, memory_limit="64MiB", headroom=0,
                                   cache=False)
    callback = GaccumTrainerCallback()
    transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=collate,
                         callbacks=[callback]).train()
    assert callback.records[0]["window_tokens"] == sum(len(d["input_ids"]) for d in data)


def test_the_eval_batch_is_planned_apart_and_the_trainer_evaluates_with_it(tmp_path):
    model, data = tiny_gpt2(), dataset()
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_steps=1,
                                          save_strategy="no")
    new, plan = plan_training_arguments(model, args, data, collate, target_bs=64, memory_limit="6MiB", headroom=0,
                                        cache=False, return_plan=True, eval_dataset=data)
    assert new.per_device_eval_batch_size > new.per_device_train_batch_size  # forward only: more fits
    assert any("eval batch" in n for n in plan.notes)
    trainer = transformers.Trainer(model=model, args=new, train_dataset=data, eval_dataset=data, data_collator=collate)
    assert "eval_loss" in trainer.evaluate()


def test_a_stream_is_planned_from_its_first_examples_without_len(tmp_path):
    from torch.utils.data import IterableDataset

    data = dataset()

    class Stream(IterableDataset):  # no len(), no indexing: read in order
        def __iter__(self):
            return iter(data)

    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_steps=1,
                                          save_strategy="no")
    new, plan = plan_training_arguments(tiny_gpt2(), args, Stream(), collate, target_bs=32, memory_limit="6MiB",
                                        headroom=0, cache=False, return_plan=True, longest=64)
    assert new.per_device_train_batch_size <= plan.max_micro_batch and plan.max_micro_batch < 32
