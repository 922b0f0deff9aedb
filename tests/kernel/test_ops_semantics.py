"""The op's documented semantics, the same on every path: the product rounded before the sum,
found_inf from the updated masters, fresh pointer tables, disjoint masters, aligned master views."""

import numpy as np
import pytest
import torch

from gaccum.accumulation import MasterGrads
from gaccum.ops import _fallback, _fallback_no_sync, pointer_tables, unscale_check_accumulate_

pytestmark = pytest.mark.usefixtures("cpu_backend")  # each test on the fused CPU pass and the PyTorch chain


def reference(m, g, s, overwrite=False):
    """float32(m + float32(float32(g) * s)) in numpy, which never fuses the two."""
    m32 = np.zeros_like(m.numpy()) if overwrite else m.numpy().astype(np.float32)
    prod = (g.float().numpy() * np.float32(s)).astype(np.float32)
    return torch.from_numpy((m32 + prod).astype(np.float32))


@pytest.mark.parametrize("path", ["op", "no_sync"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("s", [1.0, 0.2, 3.0])
@pytest.mark.parametrize("overwrite", [False, True])
def test_bitwise_the_unfused_semantics(path, dtype, s, overwrite):
    g = torch.Generator().manual_seed(0)
    sizes = (1, 7, 4099, (1 << 18) + 5)  # the last spans two chunks of the CPU scratch buffer
    grads = [(torch.randn(n, generator=g) * 1e3).to(dtype) for n in sizes]
    masters = [torch.randn(n, generator=g) * 1e3 for n in sizes]
    want = [reference(m, gr, s, overwrite) for m, gr in zip(masters, grads)]
    found = torch.zeros(1)
    if path == "op":
        unscale_check_accumulate_(grads, masters, found, s, overwrite=overwrite)
    else:
        _fallback_no_sync(grads, masters, found, torch.tensor([s]), overwrite, None)
    assert all(torch.equal(a, b) for a, b in zip(masters, want)) and float(found) == 0


@pytest.mark.parametrize("fn", ["fallback", "no_sync"])
@pytest.mark.parametrize("m0,g0,s", [(-3e38, 3e38, 2.0),  # g*s overflows; an FMA would hide it behind m
                                     (3e38, 3e38, 1.0),  # m + g overflows
                                     (float("nan"), 1.0, 1.0),  # the master was already non-finite
                                     (0.0, 3e38, 4.0)])  # inv_scale > 1 overflows a finite gradient
def test_found_inf_comes_from_the_updated_masters(fn, m0, g0, s):
    m, gr, found = torch.full((9,), m0), torch.full((9,), g0), torch.zeros(1)
    if fn == "fallback":
        _fallback([gr], [m], found, torch.tensor([s]), False, False, None)
    else:
        _fallback_no_sync([gr], [m], found, torch.tensor([s]), False, None)
    assert float(found) == 1.0 and not torch.isfinite(m).all()


def test_pointer_tables_follow_a_storage_that_changed():
    grads = [torch.zeros(1000) for _ in range(3)]
    masters = [torch.zeros(1000) for _ in range(3)]
    gp, mp, sizes, _ = pointer_tables(grads, masters)
    grads[1].set_(torch.zeros(10))
    masters[1].set_(torch.zeros(10))
    gp2, mp2, sizes2, _ = pointer_tables(grads, masters)
    assert sizes2[1] == 10 and gp2[1] == grads[1].data_ptr() and mp2[1] == masters[1].data_ptr()


def test_overlapping_or_duplicate_masters_are_refused():
    buf = torch.zeros(100)
    g = [torch.ones(50), torch.ones(50)]
    with pytest.raises(ValueError, match="overlap"):
        unscale_check_accumulate_(g, [buf[:50], buf[40:90]], torch.zeros(1))
    with pytest.raises(ValueError, match="overlap"):
        unscale_check_accumulate_(g, [buf[:50], buf[:50]], torch.zeros(1))
    unscale_check_accumulate_(g, [buf[:50], buf[50:]], torch.zeros(1))  # adjacent is fine


def test_master_views_are_16_byte_aligned_after_odd_sizes():
    params = [torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16)) for n in (3, 5, 7, 4, 1, 9)]
    mg = MasterGrads(params)
    assert all(v.data_ptr() % 16 == 0 for v in mg.views)
    assert all(v.numel() == p.numel() for v, p in zip(mg.views, params))
    mg.remove()


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("s", [1.0, 0.5])
def test_large_tensors_checked_piece_by_piece_flag_only_real_non_finites(overwrite, s):
    """Large tensors are updated and checked per 1 MiB piece: an inf in the middle of the third piece is
    found, and huge finite values (whose squares overflow float32) are not mistaken for one."""
    n = 3 * (1 << 18) + 11
    huge = torch.full((n,), 1e30)
    found = torch.zeros(1)
    unscale_check_accumulate_([huge.clone()], [torch.zeros(n)], found, s, overwrite=overwrite)
    assert float(found) == 0.0
    g = torch.ones(n, dtype=torch.bfloat16)
    g[2 * (1 << 18) + 5] = float("inf")
    m = torch.zeros(n)
    unscale_check_accumulate_([g], [m], found, s, overwrite=overwrite)
    assert float(found) == 1.0 and int((~torch.isfinite(m)).sum()) == 1
