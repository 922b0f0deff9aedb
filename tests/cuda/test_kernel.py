"""The fused CUDA kernel vs the PyTorch fallback vs a float64 reference.

Skipped without a GPU. Never run in this repository's CI (no GPU there): the
GPU session runs it, and compute-sanitizer (memcheck, racecheck) on it.
"""

import copy

import pytest
import torch

import gaccum
from gaccum import _ext, ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def ext():
    mod = _ext.load()
    if mod is None:
        pytest.skip(f"compiled module unavailable: {_ext.reason()}")
    return mod


def run_both(grads, masters, inv_scale=0.25, **kw):
    """(kernel masters, kernel found_inf, fallback masters, fallback found_inf, sq norms)."""
    fb_m = [m.clone() for m in masters]
    fb_g = [g.clone() for g in grads]
    f_k, f_f = torch.zeros(1, device="cuda"), torch.zeros(1, device="cuda")
    sq_k = torch.zeros(1, device="cuda") if kw.pop("norm", False) else None
    sq_f = None if sq_k is None else torch.zeros(1, device="cuda")
    s = torch.tensor([inv_scale], device="cuda")
    gaccum.unscale_check_accumulate_(grads, masters, f_k, s, sq_norm=sq_k, **kw)
    ops._fallback(fb_g, fb_m, f_f, s, kw.get("overwrite", False), kw.get("zero_grads", False), sq_f)
    torch.cuda.synchronize()
    return masters, f_k, fb_m, f_f, sq_k, sq_f, fb_g


SIZES = [0, 1, 555, 33333, 65535, 65536, 65537, 3 * 65536 + 7]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("overwrite", [False, True])
def test_kernel_matches_fallback_and_float64(ext, dtype, overwrite):
    torch.manual_seed(0)
    grads = [torch.randn(n, device="cuda").to(dtype) for n in SIZES]
    masters = [torch.randn(n, device="cuda") for n in SIZES]
    ref = [(0 if overwrite else m.double()) + g.double() * 0.25 for g, m in zip(grads, masters)]
    km, kf, fm, ff, sk, sf, _ = run_both(grads, masters, overwrite=overwrite, norm=True)
    for a, b, r in zip(km, fm, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a.double(), r, rtol=1e-6, atol=1e-6)
    assert float(kf) == float(ff) == 0.0
    torch.testing.assert_close(sk, sf, rtol=1e-4, atol=1e-3)


def test_mixed_dtypes_and_misaligned_views_in_one_call(ext):
    base = torch.randn(70001, device="cuda")
    grads = [base[1:], base.half()[3:40003], base.bfloat16()[5:], torch.randn(7, device="cuda")]
    masters = [torch.zeros(g.numel(), device="cuda") for g in grads]
    km, kf, fm, ff, *_ = run_both(grads, masters)
    for a, b in zip(km, fm):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_anywhere_sets_found_inf(ext, where, bad, dtype):
    grads = [torch.randn(n, device="cuda").to(dtype) for n in (100, 65537, 33)]
    t = {"first": 0, "middle": 1, "last": 2}[where]
    grads[t][{"first": 0, "middle": 40000, "last": -1}[where] % grads[t].numel()] = bad
    masters = [torch.zeros(g.numel(), device="cuda") for g in grads]
    _, kf, _, ff, *_ = run_both(grads, masters)
    assert float(kf) == 1.0 == float(ff)


def test_found_inf_never_cleared_and_zero_grads(ext):
    g = [torch.randn(1000, device="cuda").half()]
    m = [torch.zeros(1000, device="cuda")]
    f = torch.ones(1, device="cuda")
    gaccum.unscale_check_accumulate_(g, m, f, 1.0, zero_grads=True)
    assert float(f) == 1.0 and float(g[0].abs().sum()) == 0.0


def test_many_tensors_need_several_launches(ext):
    grads = [torch.randn(int(n), device="cuda").bfloat16() for n in torch.randint(1, 4096, (10_000,))]
    masters = [torch.zeros(g.numel(), device="cuda") for g in grads]
    km, kf, fm, ff, *_ = run_both(grads, masters)
    assert all(torch.equal(a, b) for a, b in zip(km, fm))


def test_more_than_2_pow_31_elements(ext):
    free, _ = torch.cuda.mem_get_info()
    n = 2**31 + 4096
    if free < n * 6 + (2 << 30):
        pytest.skip("not enough GPU memory")
    g = torch.ones(n, dtype=torch.float16, device="cuda")
    m = torch.zeros(n, device="cuda")
    g[-1] = 3.0
    f = torch.zeros(1, device="cuda")
    gaccum.unscale_check_accumulate_([g], [m], f, 0.5)
    assert float(m[-1]) == 1.5 and float(m[2**31 + 1]) == 0.5 and float(f) == 0.0


def test_non_default_stream_and_cuda_graph(ext):
    g = [torch.randn(100000, device="cuda").bfloat16()]
    m = [torch.zeros(100000, device="cuda")]
    f, s = torch.zeros(1, device="cuda"), torch.ones(1, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # its inputs were made on the current stream
    with torch.cuda.stream(stream):
        gaccum.unscale_check_accumulate_(g, m, f, s)
    stream.synchronize()
    torch.testing.assert_close(m[0], g[0].float())
    m[0].zero_()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gaccum.unscale_check_accumulate_(g, m, f, s)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    m[0].zero_()
    with torch.cuda.graph(graph):
        gaccum.unscale_check_accumulate_(g, m, f, s)
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(m[0], 2 * g[0].float())


def test_channels_last_pairs_go_to_the_fallback(ext):
    g = torch.randn(2, 3, 4, 5, device="cuda").to(memory_format=torch.channels_last).half()
    m = torch.zeros(2, 3, 4, 5, device="cuda")
    f = torch.zeros(1, device="cuda")
    gaccum.unscale_check_accumulate_([g], [m], f, 1.0)
    torch.testing.assert_close(m, g.float())


def test_gradscaler_round_trip_skips_on_inf(ext):
    model = torch.nn.Linear(64, 64).cuda().half()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16)
    acc = gaccum.Accumulator(model, opt, accum_steps=2, scaler=scaler)
    x = torch.randn(8, 64, device="cuda").half()
    before = [p.clone() for p in model.parameters()]
    for i in range(2):
        with acc.accumulate():
            loss = model(x).float().pow(2).mean() * (float("inf") if i == 1 else 1.0)
            r = acc.backward(loss)
    assert r.skipped and scaler.get_scale() == 2.0**15
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_accumulator_half_model_on_gpu_matches_float64(ext):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).cuda()
    half = model.bfloat16()
    ref = copy.deepcopy(half).double()  # the same (bf16-rounded) weights, in float64
    xs = torch.randn(64, 8, 32, device="cuda")
    captured = []
    acc = gaccum.Accumulator(half, torch.optim.SGD(half.parameters(), lr=0.0), accum_steps=64)
    acc.core.boundary.pre_step_hooks.append(lambda ws: captured.extend(w.grad.clone() for w in ws))
    for x in xs:
        with acc.accumulate():
            acc.backward(half(x.bfloat16()).float().pow(2).mean())
    assert captured and all(torch.isfinite(c).all() for c in captured)
    assert ops.backend_for("cuda") == "cuda-kernel"
    # the window's gradient against the float64 mean over the 64 micro-batches (bf16 forward: 2e-2)
    torch.stack([ref(x.bfloat16().double()).pow(2).mean() for x in xs]).mean().backward()
    for c, r in zip(captured, ref.parameters()):
        assert float((c.double() - r.grad).abs().max() / r.grad.abs().max()) < 2e-2


def test_master_grads_hot_path_equals_the_op_bitwise(ext):
    """MasterGrads flushes through _C.MasterSet (registered once, launched by index) on a GPU; the
    FP32 window it builds is the custom op's, bit for bit, and no half gradient is left behind."""
    from gaccum.accumulation import MasterGrads

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(33, 70), torch.nn.Tanh(), torch.nn.Linear(70, 5)).cuda().bfloat16()
    xs = torch.randn(3, 16, 33, device="cuda").bfloat16()

    def window(fused):
        model = copy.deepcopy(base)
        masters = MasterGrads(list(model.parameters()))
        assert masters._fused is not None
        if not fused:
            masters._fused = None  # the custom op's path
        for x in xs:
            model(x).float().pow(2).mean().backward()
        masters.finalize()
        torch.cuda.synchronize()
        out = [v.clone() for v in masters.views]
        assert all(p.grad is None for p in model.parameters())
        masters.remove()
        return out

    assert all(torch.equal(a, b) for a, b in zip(window(True), window(False)))


def test_planner_real_oom_on_gpu():
    model = torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 4096)).cuda()
    sample = lambda b: torch.randn(b, 4096, device="cuda")  # noqa: E731
    loss = lambda m, x: m(x).float().pow(2).mean()  # noqa: E731
    # 2**24 samples need ~0.8 TB of activations: more than any GPU holds (2**20 fits in an H200's 139 GiB)
    p = gaccum.plan(model, target_bs=1 << 24, sample=sample, loss_fn=loss, amp="bf16", cache=False)
    assert 1 <= p.max_micro_batch < 1 << 24
    assert any(r.batch == p.max_micro_batch and r.fit for r in p.probes)


def test_a_float_inv_scale_inside_graph_capture_is_refused(ext):
    g, m = [torch.randn(64, device="cuda")], [torch.zeros(64, device="cuda")]
    f = torch.zeros(1, device="cuda")
    graph = torch.cuda.CUDAGraph()
    gaccum.unscale_check_accumulate_(g, m, f, torch.ones(1, device="cuda"))  # warm outside the capture
    with pytest.raises(ValueError, match="inside CUDA-graph capture"):
        with torch.cuda.graph(graph):
            gaccum.unscale_check_accumulate_(g, m, f, 0.5)


def test_a_module_that_sees_no_device_falls_back_everywhere(ext, monkeypatch):
    """A driver or architecture the module cannot use shows as 0 devices to it: every path falls back."""
    monkeypatch.setattr(_ext, "_usable", {id(ext): False})
    assert ops.backend_for("cuda") == "pytorch-fallback"
    model = torch.nn.Linear(16, 4).cuda().bfloat16()
    acc = gaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), accum_steps=2)
    assert acc.core.masters._fused is None  # was: MasterSet raised at construction
    acc.close()


def test_master_buckets_fill_two_waves_of_blocks(ext):
    from gaccum.accumulation.masters import bucket_bytes_for

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    blocks = bucket_bytes_for(torch.device("cuda")) // (65536 * 2)  # bf16 chunks of 65,536 elements
    assert blocks >= 2 * 4 * sms  # two waves of 4 blocks per SM (an H200: 1,056 blocks)


@pytest.mark.parametrize("fused", [True, False])
def test_a_flush_on_a_side_stream_keeps_the_freed_gradients_until_it_has_read_them(ext, fused):
    """The masters flush on a delayed side stream; the default stream then allocates and overwrites memory of
    the freed gradients' sizes at once. Without record_stream the allocator hands their blocks over before
    the side stream's launch reads them, and the masters take the garbage."""
    from gaccum.accumulation import MasterGrads

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Tanh(), torch.nn.Linear(512, 64)).cuda().bfloat16()
    masters = MasterGrads(list(model.parameters()))
    if not fused:
        masters._fused = None  # the custom op's path
    model(torch.randn(32, 256, device="cuda").bfloat16()).float().pow(2).mean().backward()
    want = [p.grad.float().clone() for p in model.parameters()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s: the launch below waits behind it
        masters.finalize()
    junk = [torch.full_like(w, float("nan"), dtype=torch.bfloat16) for w in want for _ in range(4)]
    torch.cuda.synchronize()
    assert all(torch.equal(v.view_as(w), w) for v, w in zip(masters.views, want))
    del junk
    masters.remove()


def test_an_error_pending_before_the_launch_is_said_to_be_earlier_work(ext):
    """A sticky CUDA error left by earlier work (here an illegal address from a launch given a bogus
    master pointer, seen by torch's synchronize) is reported as earlier work at the next launch, not as
    this launch's failure. In a fresh process: the error ends the CUDA context."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch, gaccum
        from gaccum import _ext, ops
        ext = _ext.load()
        g = torch.ones(1 << 20, device="cuda")
        f, s = torch.zeros(1, device="cuda"), torch.ones(1, device="cuda")
        ext.unscale_check_accumulate([g.data_ptr()], [16], [g.numel()], [0], s.data_ptr(), f.data_ptr(), 0,
                                     False, False, ops._stream(g.device))
        try:
            torch.cuda.synchronize()
        except RuntimeError as exc:
            print("TORCH SAW", exc)
        try:
            ext.unscale_check_accumulate([g.data_ptr()], [g.data_ptr()], [1], [0], s.data_ptr(), f.data_ptr(), 0,
                                         False, False, ops._stream(g.device))
        except RuntimeError as exc:
            print("GACCUM SAID", exc)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "TORCH SAW" in r.stdout, r.stdout + r.stderr
    assert "GACCUM SAID gaccum: a CUDA error was pending before gaccum's launch" in r.stdout, r.stdout + r.stderr
