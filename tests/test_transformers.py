"""A real model from outside: Hugging Face GPT-2 from a small config (random weights, no download).

Variable-length sequences, right-padded, labels -100 on padding: the loss is the
mean over real tokens, so accumulation must weight each micro-batch by its token
count (``num_items``) to equal one large batch.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import gaccum
from conftest import max_abs_diff

transformers = pytest.importorskip("transformers")

VOCAB, T = 64, 24


def tiny_gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1,
                                  loss_type="ForCausalLM")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).double()


def batch(b, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, T), generator=g)
    lengths = torch.randint(3, T + 1, (b,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def hf_loss(model, b):
    return model(**b).loss  # transformers' own mean over the micro-batch's real (shifted) tokens


def lm_loss(model, b):
    """The same shifted mean as ``hf_loss``, kept in float64: transformers' loss upcasts logits
    to float32 (``logits.float()``), which would cap a float64 comparison near 1e-7."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), b["labels"][:, 1:].reshape(-1), ignore_index=-100)


def tokens(b):
    return int((b["labels"][:, 1:] != -100).sum())


def loss_and_tokens(model, b):
    return lm_loss(model, b), tokens(b)


def test_gpt2_plans_and_trains_with_token_normalisation_like_one_large_batch():
    model = tiny_gpt2()
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    target = 24
    plan = gaccum.plan(model, target_bs=target, sample=lambda b: batch(b, seed=b), loss_fn=hf_loss, optimizer=opt,
                       memory_limit="5MiB", headroom=0, cache=False)
    assert plan.accum_steps > 1 and plan.effective_batch_size == target, plan.table()

    acc = gaccum.Accumulator(model, opt, plan=plan)
    windows = [batch(target, seed=100 + s) for s in range(2)]
    for big in windows:
        for micro in gaccum.batch.split_batch(big, plan.micro_batch_size):
            acc.micro_batch(micro, loss_and_tokens)
    assert acc.optimizer_steps == 2

    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1)
    for big in windows:
        ropt.zero_grad()
        lm_loss(ref, big).backward()
        ropt.step()
    assert max_abs_diff(model.parameters(), ref.parameters()) < 1e-10

    report = gaccum.verify(model, lm_loss, batch(target, seed=7), plan.micro_batch_size, num_items_fn=tokens)
    assert report.passed and report.max_rel_diff < 1e-10, report.verdict
    # transformers' own .loss: right to its float32 loss arithmetic
    report = gaccum.verify(model, hf_loss, batch(target, seed=7), plan.micro_batch_size, num_items_fn=tokens,
                           tolerance=1e-6)
    assert report.passed, report.verdict


def test_gpt2_mean_of_means_is_what_token_counts_fix():
    """Without num_items the accumulated gradient is a mean of per-micro-batch means: measurably off."""
    model = tiny_gpt2()
    big = batch(24, seed=5)
    right = gaccum.verify(model, lm_loss, big, 8, num_items_fn=tokens)
    wrong = gaccum.verify(model, lm_loss, big, 8, num_items_fn=lambda b: b["input_ids"].shape[0])
    assert right.passed and not wrong.passed
    assert wrong.max_rel_diff > 1e3 * max(right.max_rel_diff, 1e-16)
