import pytest
import torch
from torch.library import opcheck

import gaccum
from gaccum import ops

pytestmark = pytest.mark.usefixtures("cpu_backend")  # each test on the fused CPU pass and the PyTorch chain


def _ref(grads, masters, inv_scale, overwrite):
    out = []
    for g, m in zip(grads, masters):
        base = torch.zeros_like(m, dtype=torch.float64) if overwrite else m.double()
        out.append(base + g.double() * inv_scale)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("overwrite", [False, True])
def test_fallback_matches_float64_reference(dtype, overwrite):
    torch.manual_seed(0)
    sizes = [0, 1, 555, 33333, 65535, 65537]
    grads = [torch.randn(n).to(dtype) for n in sizes]
    masters = [torch.randn(n) for n in sizes]
    ref = _ref(grads, masters, 0.125, overwrite)
    found, sq = torch.zeros(1), torch.zeros(1)
    gaccum.unscale_check_accumulate_(grads, masters, found, 0.125, overwrite=overwrite, sq_norm=sq)
    for m, r in zip(masters, ref):
        torch.testing.assert_close(m.double(), r, rtol=1e-6, atol=1e-6)
    assert float(found) == 0.0
    expected_sq = sum(float((r.float() ** 2).sum()) for r in ref)
    assert float(sq) == pytest.approx(expected_sq, rel=1e-4)


def test_mixed_dtypes_in_one_call_and_scalar_inv_scale_tensor():
    grads = [torch.ones(3, dtype=torch.float16), torch.ones(2, dtype=torch.bfloat16), torch.ones(4)]
    masters = [torch.zeros(3), torch.full((2,), 2.0), torch.zeros(4)]
    found = torch.zeros(1)
    torch.ops.gaccum.unscale_check_accumulate_(grads, masters, found, torch.tensor([0.5]))
    assert masters[0].tolist() == [0.5] * 3 and masters[1].tolist() == [2.5] * 2 and masters[2].tolist() == [0.5] * 4


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("position", [0, 17, -1])
@pytest.mark.parametrize("which", [0, 2])
def test_found_inf_set_for_any_non_finite_in_any_tensor(bad, position, which):
    grads = [torch.randn(40).bfloat16(), torch.randn(7), torch.randn(33).half()]
    grads[which][position] = bad
    masters = [torch.zeros(g.shape) for g in grads]
    found = torch.zeros(1)
    gaccum.unscale_check_accumulate_(grads, masters, found, 1.0)
    assert float(found) == 1.0


def test_found_inf_is_never_cleared_and_overflow_is_not_a_false_positive():
    found = torch.ones(1)
    gaccum.unscale_check_accumulate_([torch.ones(4)], [torch.zeros(4)], found, 1.0)
    assert float(found) == 1.0
    # Finite but huge values overflow the L2 norm used as a fast check; the exact
    # re-check must keep found_inf clear.
    found = torch.zeros(1)
    big = [torch.full((8,), 3e37)]
    gaccum.unscale_check_accumulate_(big, [torch.zeros(8)], found, 1.0)
    assert float(found) == 0.0


def test_zero_grads_option():
    g = [torch.randn(10).bfloat16(), torch.randn(3)]
    m = [torch.zeros(10), torch.zeros(3)]
    gaccum.unscale_check_accumulate_(g, m, torch.zeros(1), 2.0, zero_grads=True)
    assert all(float(x.abs().sum()) == 0.0 for x in g)
    assert float(m[0].abs().sum()) > 0


def test_empty_list_is_a_no_op():
    found = torch.zeros(1)
    gaccum.unscale_check_accumulate_([], [], found, 1.0)
    assert float(found) == 0.0


def test_opcheck_passes():
    args = ([torch.randn(5).bfloat16(), torch.randn(3, 2)], [torch.zeros(5), torch.zeros(3, 2)],
            torch.zeros(1), torch.ones(1))
    opcheck(torch.ops.gaccum.unscale_check_accumulate_.default, args)
    opcheck(torch.ops.gaccum.unscale_check_accumulate_.default, args + (True, True, torch.zeros(1)))


def test_op_works_under_torch_compile():
    g, m, f = [torch.randn(6).bfloat16()], [torch.zeros(6)], torch.zeros(1)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(g, m, f, s):
        torch.ops.gaccum.unscale_check_accumulate_(g, m, f, s)

    step(g, m, f, torch.tensor([2.0]))
    torch.testing.assert_close(m[0], g[0].float() * 2)


@pytest.mark.parametrize(
    "grads,masters,found,inv,err",
    [
        ([torch.ones(2)], [], torch.zeros(1), 1.0, ValueError),
        ([torch.ones(2, dtype=torch.int32)], [torch.zeros(2)], torch.zeros(1), 1.0, TypeError),
        ([torch.ones(2)], [torch.zeros(2, dtype=torch.float16)], torch.zeros(1), 1.0, TypeError),
        ([torch.ones(2)], [torch.zeros(3)], torch.zeros(1), 1.0, ValueError),
        ([torch.ones(2)], [torch.zeros(2)], torch.zeros(2), 1.0, TypeError),
        ([torch.ones(2)], [torch.zeros(2)], torch.zeros(1, dtype=torch.float64), 1.0, TypeError),
    ],
)
def test_bad_input_is_rejected_before_anything_changes(grads, masters, found, inv, err):
    before = [m.clone() for m in masters]
    with pytest.raises(err):
        gaccum.unscale_check_accumulate_(grads, masters, found, inv)
    assert all(torch.equal(a, b) for a, b in zip(before, masters))
