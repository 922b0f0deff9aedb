import copy
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaccum
from conftest import max_abs_diff, max_rel_diff, mlp, regression_data
from helpers import chunks, large_batch_train


def run_accumulated(model, opt, micro_batches, accum_steps, loss_fn=F.mse_loss, **kw):
    acc = gaccum.Accumulator(model, opt, accum_steps=accum_steps, **kw)
    results = []
    for x, y in micro_batches:
        with acc.accumulate():
            results.append(acc.backward(loss_fn(model(x), y)))
    flushed = acc.flush()
    return acc, results, flushed


OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


# a. N micro-batches == one large batch -------------------------------------
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_float64_three_steps_match_large_batch_within_1e10(opt_name):
    x, y = regression_data(48)
    ref, ours = mlp(), mlp()
    large_batch_train(ref, OPTIMIZERS[opt_name](ref.parameters()), chunks(x, y, 16))
    acc, _, _ = run_accumulated(ours, OPTIMIZERS[opt_name](ours.parameters()), chunks(x, y, 4), accum_steps=4)
    assert acc.optimizer_steps == 3
    assert max_abs_diff(ours.parameters(), ref.parameters()) < 1e-10


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_float32_matches_large_batch_within_1e5_relative(opt_name):
    x, y = regression_data(48, dtype=torch.float32)
    ref, ours = mlp(torch.float32), mlp(torch.float32)
    large_batch_train(ref, OPTIMIZERS[opt_name](ref.parameters()), chunks(x, y, 16))
    run_accumulated(ours, OPTIMIZERS[opt_name](ours.parameters()), chunks(x, y, 4), accum_steps=4)
    assert max_rel_diff(ours.parameters(), ref.parameters()) < 1e-5


def test_accumulate_without_mean_of_means_error_float32_masters_forced():
    """The FP32 master path on fp32 parameters must give the same answer as .grad."""
    x, y = regression_data(48, dtype=torch.float32)
    ref, ours = mlp(torch.float32), mlp(torch.float32)
    large_batch_train(ref, OPTIMIZERS["adamw"](ref.parameters()), chunks(x, y, 16))
    acc, _, _ = run_accumulated(ours, OPTIMIZERS["adamw"](ours.parameters()), chunks(x, y, 4), 4, master_grads=True)
    assert acc.uses_master_grads
    assert max_rel_diff(ours.parameters(), ref.parameters()) < 1e-5


# b. num_items: token normalisation --------------------------------------------
class TinyLM(nn.Module):
    def __init__(self, vocab=11, d=8):
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(vocab, d)
        self.out = nn.Linear(d, vocab)

    def forward(self, tokens):
        return self.out(torch.tanh(self.emb(tokens)))


def variable_length_batches(n_batches=4, per_batch=3, vocab=11, seed=5):
    """Sequences of different lengths padded to each batch's longest, labels -100 on padding."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        lengths = torch.randint(1, 9, (per_batch,), generator=g)
        T = int(lengths.max())
        tok = torch.randint(0, vocab, (per_batch, T), generator=g)
        lab = torch.randint(0, vocab, (per_batch, T), generator=g)
        for i, L in enumerate(lengths.tolist()):
            tok[i, L:] = 0
            lab[i, L:] = -100
        batches.append((tok, lab))
    return batches


def lm_loss(model, tok, lab):
    logits = model(tok)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), lab.reshape(-1), ignore_index=-100)


def test_num_items_gives_mean_over_all_tokens_not_mean_of_means():
    batches = variable_length_batches()
    ref, ours, naive = TinyLM().double(), TinyLM().double(), TinyLM().double()
    # Reference: one step on the concatenation of all tokens (sum over tokens / total tokens).
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.5)
    total = sum(int((lab != -100).sum()) for _, lab in batches)
    loss = sum(F.cross_entropy(ref(t).reshape(-1, 11), l.reshape(-1), ignore_index=-100, reduction="sum")
               for t, l in batches) / total
    loss.backward()
    opt_r.step()
    acc = gaccum.Accumulator(ours, torch.optim.SGD(ours.parameters(), lr=0.5), accum_steps=len(batches))
    for tok, lab in batches:
        with acc.accumulate():
            acc.backward(lm_loss(ours, tok, lab), num_items=int((lab != -100).sum()))
    assert acc.optimizer_steps == 1
    assert max_abs_diff(ours.parameters(), ref.parameters()) < 1e-12
    # Without num_items it is a mean of means, which differs: the test can tell.
    acc2 = gaccum.Accumulator(naive, torch.optim.SGD(naive.parameters(), lr=0.5), accum_steps=len(batches))
    for tok, lab in batches:
        with acc2.accumulate():
            acc2.backward(lm_loss(naive, tok, lab))
    assert max_abs_diff(naive.parameters(), ref.parameters()) > 1e-6


def test_num_items_accepts_a_tensor():
    batches = variable_length_batches(2)
    a, b = TinyLM().double(), TinyLM().double()
    for model, as_tensor in ((a, True), (b, False)):
        acc = gaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.5), accum_steps=2)
        for tok, lab in batches:
            with acc.accumulate():
                n = (lab != -100).sum()
                acc.backward(lm_loss(model, tok, lab), num_items=n if as_tensor else int(n))
    assert max_abs_diff(a.parameters(), b.parameters()) == 0.0


def test_uneven_window_1000_as_3x300_plus_100_weights_by_size():
    x, y = regression_data(1000)
    ref, by_plan, by_items = mlp(), mlp(), mlp()
    large_batch_train(ref, torch.optim.SGD(ref.parameters(), lr=0.1), [(x, y)])
    sizes = [300, 300, 300, 100]
    bounds = [0, 300, 600, 900, 1000]
    micro = [(x[a:b], y[a:b]) for a, b in zip(bounds, bounds[1:])]
    plan = types.SimpleNamespace(accum_steps=4, window=sizes)
    acc = gaccum.Accumulator(by_plan, torch.optim.SGD(by_plan.parameters(), lr=0.1), plan=plan)
    for xb, yb in micro:
        with acc.accumulate():
            acc.backward(F.mse_loss(by_plan(xb), yb))
    acc2 = gaccum.Accumulator(by_items, torch.optim.SGD(by_items.parameters(), lr=0.1), accum_steps=4)
    for xb, yb in micro:
        with acc2.accumulate():
            acc2.backward(F.mse_loss(by_items(xb), yb), num_items=xb.shape[0])
    assert acc.optimizer_steps == acc2.optimizer_steps == 1
    assert max_abs_diff(by_plan.parameters(), ref.parameters()) < 1e-12
    assert max_abs_diff(by_items.parameters(), ref.parameters()) < 1e-12


# c. flush --------------------------------------------------------------------
def test_flush_steps_partial_window_divided_by_its_real_length():
    x, y = regression_data(40)  # 10 micro-batches of 4, N=4 -> 4 + 4 + 2
    ref, ours = mlp(), mlp()
    large_batch_train(ref, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9),
                      [(x[:16], y[:16]), (x[16:32], y[16:32]), (x[32:], y[32:])])
    acc, results, flushed = run_accumulated(ours, torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9),
                                            chunks(x, y, 4), accum_steps=4)
    assert flushed is not None and flushed.stepped
    assert acc.optimizer_steps == 3
    assert max_abs_diff(ours.parameters(), ref.parameters()) < 1e-12
    assert acc.flush() is None  # nothing left


@pytest.mark.parametrize("how", ["flush_arg", "drop_last"])
def test_flush_can_drop_the_partial_window(how):
    x, y = regression_data(40)
    ref, ours = mlp(), mlp()
    large_batch_train(ref, torch.optim.SGD(ref.parameters(), lr=0.1), [(x[:16], y[:16]), (x[16:32], y[16:32])])
    acc = gaccum.Accumulator(ours, torch.optim.SGD(ours.parameters(), lr=0.1), accum_steps=4,
                             drop_last=(how == "drop_last"))
    for xb, yb in chunks(x, y, 4):
        with acc.accumulate():
            acc.backward(F.mse_loss(ours(xb), yb))
    assert (acc.flush(drop=True) if how == "flush_arg" else acc.flush()) is None
    assert acc.optimizer_steps == 2
    assert max_abs_diff(ours.parameters(), ref.parameters()) < 1e-12
    assert all(p.grad is None for p in ours.parameters())


# d. AMP ------------------------------------------------------------------------
def documented_amp_loop(model, opt, scaler, micro, N, dtype, sched=None):
    """torch.amp docs, 'Gradient accumulation': scale the loss by 1/N, step every N."""
    for i, (x, y) in enumerate(micro):
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = F.mse_loss(model(x), y) / N
        scaler.scale(loss).backward()
        if (i + 1) % N == 0:
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if sched is not None:
                sched.step()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_amp_with_gradscaler_matches_documented_loop(dtype):
    x, y = regression_data(64, dtype=torch.float32)
    ref, ours = mlp(torch.float32), mlp(torch.float32)
    opt_r, opt_o = torch.optim.AdamW(ref.parameters(), lr=1e-2), torch.optim.AdamW(ours.parameters(), lr=1e-2)
    sc_r, sc_o = torch.amp.GradScaler("cpu", init_scale=1024.0), torch.amp.GradScaler("cpu", init_scale=1024.0)
    documented_amp_loop(ref, opt_r, sc_r, chunks(x, y, 4), 4, dtype)
    acc = gaccum.Accumulator(ours, opt_o, accum_steps=4, scaler=sc_o)
    for xb, yb in chunks(x, y, 4):
        with acc.accumulate():
            with torch.autocast("cpu", dtype=dtype):
                loss = F.mse_loss(ours(xb), yb)
            acc.backward(loss)
    assert acc.optimizer_steps == 4
    assert max_rel_diff(ours.parameters(), ref.parameters()) < 1e-6
    assert sc_o.get_scale() == sc_r.get_scale()


def test_amp_inf_skips_the_step_discards_the_window_and_updates_scale_once():
    x, y = regression_data(32, dtype=torch.float32)
    model = mlp(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    acc = gaccum.Accumulator(model, opt, accum_steps=4, scaler=scaler, scheduler=sched)
    before = copy.deepcopy(model.state_dict())
    results = []
    for i, (xb, yb) in enumerate(chunks(x, y, 4)):
        with acc.accumulate():
            loss = F.mse_loss(model(xb), yb)
            if i == 1:
                loss = loss * float("inf")  # one bad micro-batch poisons its window
            results.append(acc.backward(loss))
    first, second = results[3], results[7]
    assert first.boundary and first.skipped and not first.stepped
    assert scaler.get_scale() == 512.0  # halved once, not once per micro-step
    assert second.stepped and not second.skipped
    assert acc.optimizer_steps == 1 and acc.skipped_steps == 1
    # h. the scheduler stepped only for the real step
    assert sched.last_epoch == 1
    # the skipped window left no gradient behind: same weights as training on window 2 alone
    ref = mlp(torch.float32)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    documented_amp_loop(ref, ref_opt, torch.amp.GradScaler("cpu", init_scale=512.0), chunks(x[16:], y[16:], 4), 4,
                        None)
    assert max_rel_diff(model.parameters(), ref.parameters()) < 1e-6


# e. FP32 master gradients for half parameters -----------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_params_use_fp32_masters_and_beat_half_grad_accumulation(dtype):
    torch.manual_seed(0)
    N = 64
    x, y = regression_data(N * 8, dtype=torch.float64, seed=7)
    base = mlp(torch.float64, seed=11).to(dtype)
    micro = [(xb.to(dtype), yb.to(dtype)) for xb, yb in chunks(x, y, 8)]
    # float64 reference: the exact mean of the very same half-precision micro-batch
    # gradients, so only the accumulation error is measured
    probe = copy.deepcopy(base)
    ref_grads = [torch.zeros_like(p, dtype=torch.float64) for p in probe.parameters()]
    for xb, yb in micro:
        probe.zero_grad(set_to_none=True)
        F.mse_loss(probe(xb), yb).backward()
        for r, p in zip(ref_grads, probe.parameters()):
            r += p.grad.double() / N
    # naive: half-precision .grad accumulation, loss/N per micro-batch
    naive = copy.deepcopy(base)
    for xb, yb in micro:
        (F.mse_loss(naive(xb), yb) / N).backward()
    naive_err = max_rel_diff([p.grad for p in naive.parameters()], ref_grads)
    # gaccum
    ours = copy.deepcopy(base)
    captured = []
    acc = gaccum.Accumulator(ours, torch.optim.SGD(ours.parameters(), lr=0.0), accum_steps=N)
    acc.core.boundary.pre_step_hooks.append(lambda ws: captured.extend(w.grad.clone() for w in ws))
    for xb, yb in micro:
        with acc.accumulate():
            acc.backward(F.mse_loss(ours(xb), yb))
            assert all(p.grad is None for p in ours.parameters())  # half grads freed at once
    # 4 B per parameter, each master padded to 16 bytes for the kernel's vector path
    assert acc.uses_master_grads and acc.master_grad_bytes == 4 * sum(-(-p.numel() // 4) * 4 for p in ours.parameters())
    assert all(g.dtype == torch.float32 for g in captured)
    ours_err = max_rel_diff(captured, ref_grads)
    print(f"{dtype}: half .grad accumulation rel err {naive_err:.2e}, gaccum FP32 masters {ours_err:.2e}")
    assert ours_err < 1e-5 < naive_err


def test_half_params_step_fp32_master_weights_and_copy_back():
    x, y = regression_data(32, dtype=torch.float32)
    model = mlp(torch.float32).to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    acc = gaccum.Accumulator(model, opt, accum_steps=2)
    masters = acc.core.master_weights.weights
    assert all(w.dtype == torch.float32 for w in masters)
    assert all(p.dtype == torch.float32 for g in opt.param_groups for p in g["params"])
    for xb, yb in chunks(x, y, 8):
        with acc.accumulate():
            acc.backward(F.mse_loss(model(xb.bfloat16()), yb.bfloat16()))
    # tiny updates accumulate in the FP32 weights even where bf16 cannot show them
    for p, w in zip(model.parameters(), masters):
        assert torch.equal(p, w.to(torch.bfloat16))
    acc.close()
    assert all(p.dtype == torch.bfloat16 for g in opt.param_groups for p in g["params"])


# h. result, scheduler, lr helpers ------------------------------------------------
def test_step_result_and_scheduler_once_per_optimizer_step():
    x, y = regression_data(24)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    _, results, flushed = run_accumulated(model, opt, chunks(x, y, 4), accum_steps=4, scheduler=sched)
    assert [r.stepped for r in results] == [False, False, False, True, False, False]
    assert flushed.stepped and sched.last_epoch == 2
    assert results[3].optimizer_step == 1 and results[3].micro_step == 4


def test_scale_lr_and_num_optimizer_steps():
    assert gaccum.scale_lr(0.1, 256, 1024) == pytest.approx(0.4)
    assert gaccum.scale_lr(1e-3, 256, 1024, rule="sqrt") == pytest.approx(2e-3)
    assert gaccum.num_optimizer_steps(10, 4) == 3
    assert gaccum.num_optimizer_steps(10, 4, drop_last=True) == 2
    assert gaccum.num_optimizer_steps(0, 4) == 0
    with pytest.raises(ValueError):
        gaccum.scale_lr(0.1, 256, 1024, rule="cubic")
    with pytest.raises(ValueError):
        gaccum.scale_lr(-1, 256, 1024)
    with pytest.raises(TypeError):
        gaccum.num_optimizer_steps(10.0, 4)


# i. clipping ---------------------------------------------------------------------
def test_clipping_uses_the_accumulated_unscaled_gradient():
    x, y = regression_data(32)
    ref, ours = mlp(), mlp()
    large_batch_train(ref, torch.optim.SGD(ref.parameters(), lr=0.1), chunks(x, y, 16), max_grad_norm=0.05)
    acc, results, _ = run_accumulated(ours, torch.optim.SGD(ours.parameters(), lr=0.1), chunks(x, y, 4), 4,
                                      max_grad_norm=0.05)
    assert results[3].grad_norm is not None and results[3].grad_norm > 0.05
    assert max_abs_diff(ours.parameters(), ref.parameters()) < 1e-12


def test_clipping_with_scaler_clips_after_unscale():
    x, y = regression_data(32, dtype=torch.float32)
    ref, ours = mlp(torch.float32), mlp(torch.float32)
    large_batch_train(ref, torch.optim.SGD(ref.parameters(), lr=0.1), chunks(x, y, 16), max_grad_norm=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    acc, results, _ = run_accumulated(ours, torch.optim.SGD(ours.parameters(), lr=0.1), chunks(x, y, 4), 4,
                                      max_grad_norm=0.05, scaler=scaler)
    assert results[3].grad_norm < 10  # the unscaled norm, not x4096
    assert max_rel_diff(ours.parameters(), ref.parameters()) < 1e-5


# j. BatchNorm warning ------------------------------------------------------------
def test_batchnorm_warns_once_naming_layers():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"1 .*GroupNorm or LayerNorm.*SyncBatchNorm") as rec:
        gaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accum_steps=2)
    assert len([w for w in rec if "gaccum" in str(w.message)]) == 1


def test_no_warning_without_batch_statistics_layers():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.GroupNorm(2, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accum_steps=2)


# k. checkpoint mid-window ------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_resume_from_mid_window_checkpoint_matches_uninterrupted(dtype, tmp_path):
    x, y = regression_data(40, dtype=torch.float64)
    micro = [(a.to(dtype), b.to(dtype)) for a, b in chunks(x, y, 4)]

    def build():
        m = mlp(torch.float64).to(dtype)
        o = torch.optim.AdamW(m.parameters(), lr=1e-2)
        return m, o, gaccum.Accumulator(m, o, accum_steps=4)

    full_m, _, full_acc = build()
    for xb, yb in micro:
        with full_acc.accumulate():
            full_acc.backward(F.mse_loss(full_m(xb), yb))
    full_acc.flush()

    m1, o1, a1 = build()
    for xb, yb in micro[:6]:  # stop in the middle of the second window
        with a1.accumulate():
            a1.backward(F.mse_loss(m1(xb), yb))
    ckpt = {"model": m1.state_dict(), "opt": o1.state_dict(), "acc": a1.state_dict()}
    torch.save(ckpt, tmp_path / "ck.pt")
    ckpt = torch.load(tmp_path / "ck.pt", weights_only=False)
    m2, o2, a2 = build()
    m2.load_state_dict(ckpt["model"])
    o2.load_state_dict(ckpt["opt"])
    a2.load_state_dict(ckpt["acc"])
    for xb, yb in micro[6:]:
        with a2.accumulate():
            a2.backward(F.mse_loss(m2(xb), yb))
    a2.flush()
    assert a2.optimizer_steps == full_acc.optimizer_steps == 3
    assert max_abs_diff(m2.parameters(), full_m.parameters()) == 0.0


# l. verify ----------------------------------------------------------------------
def test_verify_reports_pass_for_float64_and_fail_with_batchnorm():
    x, y = regression_data(30)
    rep = gaccum.verify(mlp(), lambda m, b: F.mse_loss(m(b[0]), b[1]), (x, y), 7)
    assert rep.passed and rep.max_rel_diff < 1e-12 and rep.accum_steps == 5 and rep.tolerance == 1e-9
    assert "PASS" in rep.verdict and rep.to_dict()["verdict"] == rep.verdict
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).double()
    rep = gaccum.verify(bn, lambda m, b: F.mse_loss(m(b[0]), b[1]), (x, y), 5, train_mode=True)
    assert not rep.passed and "FAIL" in str(rep)


def test_verify_leaves_grads_and_mode_untouched():
    model = mlp()
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    x, y = regression_data(8)
    gaccum.verify(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), (x, y), 3)
    assert model.training
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in model.parameters())


# 3. bad input ----------------------------------------------------------------------
def _acc(**kw):
    m = mlp()
    return m, gaccum.Accumulator(m, torch.optim.SGD(m.parameters(), lr=0.1), **{"accum_steps": 2, **kw})


@pytest.mark.parametrize("steps,err", [(0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError),
                                       ("4", TypeError)])
def test_bad_accum_steps(steps, err):
    m = mlp()
    with pytest.raises(err, match="accum_steps"):
        gaccum.Accumulator(m, torch.optim.SGD(m.parameters(), lr=0.1), accum_steps=steps)


def test_backward_outside_accumulate():
    m, acc = _acc()
    x, y = regression_data(4)
    with pytest.raises(RuntimeError, match="inside `with acc.accumulate"):
        acc.backward(F.mse_loss(m(x), y))
    assert all(p.grad is None for p in m.parameters()) and acc.micro_steps == 0


def test_non_scalar_loss_and_loss_without_grad():
    m, acc = _acc()
    x, y = regression_data(4)
    with acc.accumulate():
        with pytest.raises(ValueError, match="scalar"):
            acc.backward(F.mse_loss(m(x), y, reduction="none"))
        with pytest.raises(ValueError, match="does not require grad"):
            acc.backward(F.mse_loss(m(x), y).detach())
        with pytest.raises(TypeError):
            acc.backward(1.0)
    assert all(p.grad is None for p in m.parameters()) and acc.micro_steps == 0


@pytest.mark.parametrize("n,err", [(0, ValueError), (-2, ValueError), ("3", TypeError), (float("nan"), ValueError)])
def test_bad_num_items(n, err):
    m, acc = _acc()
    x, y = regression_data(4)
    with acc.accumulate():
        with pytest.raises(err, match="num_items"):
            acc.backward(F.mse_loss(m(x), y), num_items=n)
    assert all(p.grad is None for p in m.parameters()) and acc.micro_steps == 0


def test_model_without_trainable_parameters_and_foreign_optimizer():
    m = mlp()
    for p in m.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        gaccum.Accumulator(m, torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1), accum_steps=2)
    other = mlp()
    with pytest.raises(ValueError, match="does not hold"):
        gaccum.Accumulator(mlp(), torch.optim.SGD(other.parameters(), lr=0.1), accum_steps=2)
    with pytest.raises(TypeError, match="optimizer"):
        gaccum.Accumulator(mlp(), "sgd", accum_steps=2)
    with pytest.raises(TypeError, match="model"):
        gaccum.Accumulator("model", torch.optim.SGD(other.parameters(), lr=0.1), accum_steps=2)


def test_non_finite_loss_without_scaler_raises_or_skips_and_never_corrupts():
    x, y = regression_data(16)
    m = mlp()
    acc = gaccum.Accumulator(m, torch.optim.SGD(m.parameters(), lr=0.1), accum_steps=2, nonfinite="raise")
    with acc.accumulate():
        acc.backward(F.mse_loss(m(x[:4]), y[:4]))
    saved = [p.grad.clone() for p in m.parameters()]
    with acc.accumulate():
        with pytest.raises(FloatingPointError, match="non-finite"):
            acc.backward(F.mse_loss(m(x[4:8]), y[4:8]) * float("nan"))
    assert all(torch.equal(p.grad, s) for p, s in zip(m.parameters(), saved))
    assert acc.micro_in_window == 1
    # skip: the bad micro-batch is left out, the window goes on with the rest
    ref, ours = mlp(), mlp()
    keep = torch.cat([torch.arange(0, 4), torch.arange(8, 12)])  # micro-batch 1 is skipped
    large_batch_train(ref, torch.optim.SGD(ref.parameters(), lr=0.1), [(x[keep], y[keep])])
    acc2 = gaccum.Accumulator(ours, torch.optim.SGD(ours.parameters(), lr=0.1), accum_steps=2, nonfinite="skip")
    for i, (xb, yb) in enumerate(chunks(x[:12], y[:12], 4)):
        with acc2.accumulate():
            loss = F.mse_loss(ours(xb), yb)
            acc2.backward(loss * float("inf") if i == 1 else loss)
    assert acc2.optimizer_steps == 1 and acc2.core.skipped_micro_batches == 1
    assert max_abs_diff(ours.parameters(), ref.parameters()) < 1e-12


def test_non_finite_gradient_with_finite_loss_in_master_mode_discards_window():
    m = mlp(torch.float32).to(torch.bfloat16)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    acc = gaccum.Accumulator(m, opt, accum_steps=1)
    before = [p.clone() for p in m.parameters()]
    x = torch.randn(4, 6).bfloat16()
    with acc.accumulate():
        out = m(x).sum() * 0.0  # finite loss
        out.register_hook(lambda g: g * float("inf"))  # non-finite gradient
        with pytest.warns(RuntimeWarning, match="discarded"):
            r = acc.backward(out)
    assert r.skipped and acc.optimizer_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_plan_and_accum_steps_must_agree():
    m = mlp()
    with pytest.raises(ValueError, match="disagrees"):
        gaccum.Accumulator(m, torch.optim.SGD(m.parameters(), lr=0.1), accum_steps=3,
                           plan=types.SimpleNamespace(accum_steps=4, window=[1, 1, 1, 1]))
    with pytest.raises(TypeError, match="accum_steps=N or plan"):
        gaccum.Accumulator(m, torch.optim.SGD(m.parameters(), lr=0.1))


def test_master_grads_refused_for_float64_parameters():
    m = mlp()
    with pytest.raises(ValueError, match="float64"):
        gaccum.Accumulator(m, torch.optim.SGD(m.parameters(), lr=0.1), accum_steps=2, master_grads=True)
