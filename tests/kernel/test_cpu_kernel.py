"""The fused CPU pass (csrc/cpu/accumulate.cpp, gaccum._cpu) against a plain float64 reference.

It must give the kernel's results bit for bit -- every half/bfloat16 bit pattern converted exactly, the
product rounded before the sum, the check from the updated masters -- and the same sum of squares for
any number of threads. tests/kernel/test_ops*.py run again on it through the public op (cpu_backend)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import gaccum
from gaccum import _ext, ops

ROOT = Path(__file__).resolve().parents[2]
cpu = _ext.load_cpu()
pytestmark = pytest.mark.skipif(cpu is None, reason="gaccum._cpu is not built here (no C++ compiler at install)")

# Around the pass's structure: 16 elements a step, 4,096 a work unit, threads from 262,144 elements on.
SIZES = (0, 1, 15, 16, 17, 4095, 4096, 4097, 16383, 16384, 16385, 300_007)


def reference(m, g, s, overwrite):
    """float32(m + float32(float32(g) * s)) in numpy, which never fuses the two."""
    prod = (g.float().numpy() * np.float32(s)).astype(np.float32)
    base = np.zeros_like(prod) if overwrite else m.numpy().astype(np.float32)
    return torch.from_numpy(base + prod)


def run(grads, masters, s, overwrite=False, threads=2):
    return cpu.accumulate(*ops.pointer_tables(grads, masters), s, overwrite, threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("s", [1.0, 0.3, 2.0 ** -14, 3.0])
@pytest.mark.parametrize("overwrite", [False, True])
def test_bitwise_the_float64_reference_and_the_sum_of_squares(dtype, s, overwrite):
    gen = torch.Generator().manual_seed(0)
    grads = [(torch.randn(n, generator=gen) * 300).to(dtype) for n in SIZES]
    masters = [torch.randn(n, generator=gen) * 300 for n in SIZES]
    want = [reference(m, g, s, overwrite) for m, g in zip(masters, grads)]
    sq, non_finite = run(grads, masters, s, overwrite)
    assert all(torch.equal(a, b) for a, b in zip(masters, want)) and not non_finite
    exact = sum(float((w.double() ** 2).sum()) for w in want)
    assert sq == pytest.approx(exact, rel=1e-5)  # float32 lanes of <= 1,024 squares, summed in double


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_half_bit_pattern_converts_exactly(dtype):
    """All 65,536 patterns (subnormals, +-0, inf, every NaN) in the vector body and the scalar tail alike."""
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    for offset in (0, 7):  # offset 7: the vector steps fall on other patterns, the tail on the last 9
        g = torch.cat([torch.zeros(offset, dtype=torch.int16), bits]).view(dtype)
        m = torch.full(g.shape, 123.0)
        _, non_finite = run([g], [m], 1.0, overwrite=True)
        want = g.float()
        nan = want.isnan()
        assert torch.equal(m.isnan(), nan) and torch.equal(m[~nan], want[~nan]) and non_finite


@pytest.mark.parametrize("where", [0, 15, 16, 16383, 16390, 299_999, 300_006])  # the last 7: the scalar tail
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_anywhere_is_flagged(where, bad):
    g, m = torch.ones(300_007, dtype=torch.bfloat16), torch.zeros(300_007)
    g[where] = bad
    assert run([g], [m], 0.5)[1] and int((~torch.isfinite(m)).sum()) == 1


@pytest.mark.parametrize("m0,g0,s", [(-3e38, 3e38, 2.0),  # g*s overflows: an FMA would hide it behind m
                                     (3e38, 3e38, 1.0),  # m + g overflows
                                     (float("nan"), 1.0, 1.0)])  # the master was already non-finite
def test_the_check_reads_the_updated_masters(m0, g0, s):
    m, g = torch.full((40,), m0), torch.full((40,), g0)
    assert run([g], [m], s)[1]


def test_huge_finite_values_are_not_a_false_positive():
    """Their squares overflow float32 (the sum says inf), but nothing is inf or NaN: the flag stays down."""
    g, m = torch.full((50_000,), 1e30), torch.zeros(50_000)
    sq, non_finite = run([g], [m], 1.0)
    assert not non_finite and sq == float("inf")


def test_the_same_bits_for_any_number_of_threads():
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(n, generator=gen).bfloat16() for n in (700_001, 5, 300_000, 16_384 * 3)]
    start = [torch.randn(g.shape, generator=gen) for g in grads]
    results = []
    for threads in (1, 2, 3, 8):
        masters = [m.clone() for m in start]
        sq, _ = run(grads, masters, 0.25, threads=threads)
        results.append((sq, masters))
    assert len({sq for sq, _ in results}) == 1
    assert all(torch.equal(a, b) for _, ms in results[1:] for a, b in zip(ms, results[0][1]))


def test_the_public_op_takes_the_fused_pass_for_dense_pairs_and_the_chain_for_the_rest():
    """A transposed gradient beside a contiguous master goes to the PyTorch chain; channels_last pairs and
    contiguous ones to the pass; the results are the reference's either way, found_inf and sq_norm summed."""
    gen = torch.Generator().manual_seed(2)
    g_t = torch.randn(64, 48, generator=gen).bfloat16().t()  # not contiguous
    g_cl = torch.randn(2, 3, 5, 7, generator=gen).bfloat16().contiguous(memory_format=torch.channels_last)
    g_c = torch.randn(1000, generator=gen).half()
    grads = [g_t, g_cl, g_c]
    masters = [torch.randn(48, 64, generator=gen), torch.randn(2, 3, 5, 7, generator=gen).contiguous(
        memory_format=torch.channels_last), torch.randn(1000, generator=gen)]
    want = [reference(m.contiguous(), g.contiguous(), 0.3, False).view(m.shape) for m, g in zip(masters, grads)]
    found, sq = torch.zeros(1), torch.zeros(())
    gaccum.unscale_check_accumulate_(grads, masters, found, 0.3, sq_norm=sq)
    assert all(torch.equal(a, b) for a, b in zip(masters, want)) and float(found) == 0
    assert float(sq) == pytest.approx(sum(float((w.double() ** 2).sum()) for w in want), rel=1e-6)
    assert ops.backend_for("cpu") == "cpu-kernel"


def test_fused_pass_and_pytorch_chain_agree_bitwise(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(n, generator=gen).bfloat16() for n in (3, 70_000, 400_000)]
    start = [torch.randn(g.shape, generator=gen) for g in grads]
    out = []
    for chain in (False, True):
        if chain:
            monkeypatch.setattr(_ext, "load_cpu", lambda: None)
        masters, found, sq = [m.clone() for m in start], torch.zeros(1), torch.zeros(())
        gaccum.unscale_check_accumulate_(grads, masters, found, 0.7, sq_norm=sq)
        out.append((masters, float(found), float(sq)))
    (a, fa, sa), (b, fb, sb) = out
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and fa == fb == 0 and sa == pytest.approx(sb, rel=1e-6)


def test_bad_tables_are_refused_before_anything_is_written():
    m = torch.zeros(4)
    with pytest.raises(ValueError, match="differ in length"):
        cpu.accumulate([0], [m.data_ptr()], [4, 4], [0], 1.0, False, 1)
    with pytest.raises(ValueError, match="dtype code"):
        cpu.accumulate([torch.ones(4).data_ptr()], [m.data_ptr()], [4], [7], 1.0, False, 1)
    assert torch.equal(m, torch.zeros(4))


def test_gaccum_disable_ext_switches_the_pass_off():
    r = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        from gaccum import ops
        print(ops.backend_for('cpu'))
    """)], capture_output=True, text=True, cwd=ROOT, env={**os.environ, "GACCUM_DISABLE_EXT": "1"})
    assert r.returncode == 0 and r.stdout.split() == ["pytorch-fallback"], r.stderr
