"""The fused kernel on the device against a float64 reference, case by case (``make gpu-proof``'s smoke).

Each case runs ``gaccum.unscale_check_accumulate_`` (and the MasterSet hot path) and compares every
master with a float64 reference of the op's documented arithmetic (the product rounded to float32,
then the sum): ``ulp`` is the largest difference in units in the last place (0 is bitwise; 1 is allowed
where float64 itself rounds the sum before float32 does), and
``found_inf`` must be exactly what the data says. Cases: dtypes x overwrite x zero_grads x norm,
chunk and vector edges, misaligned views, inf/NaN/overflow, 1,000 tensors (several launches), one
tensor across launches, a side stream, a CUDA-graph capture replayed twice, MasterSet. ``--quick``
keeps the small cases (for compute-sanitizer); ``--device cpu`` runs the same checks on the fallback
(the dry run's wiring check). Writes JSON to ``--out`` and exits 1 on any failed case.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gaccum import ops  # noqa: E402

EDGES = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 4095, 4097, 65535, 65536, 65537, 3 * 65536 + 7]


def ulps(got: torch.Tensor, want64: torch.Tensor) -> int:
    """Largest distance in float32 ulps between ``got`` and the float64 reference rounded to float32."""
    want = want64.float()
    if got.numel() == 0:
        return 0
    a = got.contiguous().view(torch.int32).long()
    b = want.contiguous().view(torch.int32).long()
    # order float bit patterns monotonically (negative floats count down)
    a = torch.where(a < 0, -(a & 0x7FFFFFFF), a)
    b = torch.where(b < 0, -(b & 0x7FFFFFFF), b)
    both_nan = torch.isnan(got) & torch.isnan(want)
    return int((a - b).abs().masked_fill(both_nan, 0).max())


def run_op(grads, masters, inv_scale, device, **kw):
    found = torch.zeros(1, device=device)
    sq = torch.zeros(1, device=device) if kw.pop("norm", False) else None
    # the op's documented arithmetic: the product rounded to float32, then the sum (rounded once more)
    ref = [(torch.zeros_like(m, dtype=torch.float64) if kw.get("overwrite") else m.double())
           + (g.float() * float(inv_scale)).double() for g, m in zip(grads, masters)]
    ref_sq = sum(float(r.float().double().pow(2).sum()) for r in ref)  # of the updated masters
    ops.unscale_check_accumulate_(grads, masters, found, torch.tensor([inv_scale], device=device), sq_norm=sq, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return ref, found, sq, ref_sq


def case_dtypes(device, quick):
    out = {}
    sizes = EDGES[:12] if quick else EDGES
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for overwrite in (False, True):
            for zero in (False, True):
                torch.manual_seed(0)
                grads = [torch.randn(n, device=device).to(dtype) for n in sizes]
                masters = [torch.randn(n, device=device) for n in sizes]
                ref, found, sq, ref_sq = run_op(grads, masters, 0.25, device, overwrite=overwrite, zero_grads=zero,
                                                norm=True)
                u = max(ulps(m, r) for m, r in zip(masters, ref))
                zeroed = all(bool((g == 0).all()) for g in grads) if zero else True
                norm_ok = abs(float(sq) - ref_sq) <= 1e-4 * max(ref_sq, 1.0)
                out[f"{str(dtype)[6:]} overwrite={overwrite} zero_grads={zero}"] = (
                    u <= 1 and float(found) == 0 and zeroed and norm_ok, u)
    return out


def case_misaligned(device, quick):
    base = torch.randn(70001, device=device)
    grads = [base[1:], base.half()[3:40003], base.bfloat16()[5:], base[2:9]]
    masters = [torch.zeros(g.numel(), device=device) for g in grads]
    views = [torch.zeros(g.numel() + 1, device=device)[1:] for g in grads]  # masters off a 16-byte boundary too
    ref, found, _, _ = run_op(grads, masters, 0.5, device)
    ref2, found2, _, _ = run_op(grads, views, 0.5, device)
    u = max(max(ulps(m, r) for m, r in zip(masters, ref)), max(ulps(m, r) for m, r in zip(views, ref2)))
    return {"misaligned views": (u <= 1 and float(found) == float(found2) == 0, u)}


def case_nonfinite(device, quick):
    out = {}
    for name, bad in (("inf", float("inf")), ("nan", float("nan"))):
        for where in (0, 4096, 65537):
            g = torch.randn(70000, device=device).bfloat16()
            g[where] = bad
            m = torch.zeros(70000, device=device)
            _, found, _, _ = run_op([g], [m], 1.0, device)
            out[f"{name} at {where}"] = (float(found) == 1.0, 0)
    g, m = torch.full((1000,), 3e38, device=device), torch.full((1000,), 3e38, device=device)
    _, found, _, _ = run_op([g], [m], 1.0, device)
    out["float32 overflow of the sum"] = (float(found) == 1.0, 0)
    return out


def case_launches(device, quick):
    if quick:
        return {}
    torch.manual_seed(1)
    sizes = [int(x) for x in torch.randint(1, 4096, (1000,))]
    grads = [torch.randn(n, device=device).bfloat16() for n in sizes]
    masters = [torch.randn(n, device=device) for n in sizes]
    ref, found, _, _ = run_op(grads, masters, 0.125, device)
    u = max(ulps(m, r) for m, r in zip(masters, ref))
    big = 3 * 2**26 + 5  # one tensor whose chunks need more than one launch's block table
    g, m = torch.randn(big, device=device).bfloat16(), torch.randn(big, device=device)
    ref_b, found_b, _, _ = run_op([g], [m], 0.5, device)
    ub = ulps(m, ref_b[0])
    return {"1000 tensors (several launches)": (u <= 1 and float(found) == 0, u),
            "one tensor across launches": (ub <= 1 and float(found_b) == 0, ub)}


def case_stream_and_graph(device, quick):
    if device.type != "cuda":
        return {}
    g = [torch.randn(100000, device=device).bfloat16()]
    m = [torch.zeros(100000, device=device)]
    f, s = torch.zeros(1, device=device), torch.ones(1, device=device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.unscale_check_accumulate_(g, m, f, s)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    u_stream = ulps(m[0], g[0].double())
    m[0].zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.unscale_check_accumulate_(g, m, f, s)
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    u_graph = ulps(m[0], 2 * g[0].double())
    return {"side stream": (u_stream <= 1, u_stream), "CUDA graph replayed twice": (u_graph <= 1, u_graph)}


def case_masterset(device, quick):
    from gaccum.accumulation import MasterGrads

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(33, 70), torch.nn.Tanh(), torch.nn.Linear(70, 5)).to(device)
    model = model.bfloat16()
    xs = torch.randn(3, 16, 33, device=device).bfloat16()
    masters = MasterGrads(list(model.parameters()))
    grads64 = [torch.zeros(p.shape, dtype=torch.float64, device=device) for p in model.parameters()]
    for x in xs:
        loss = model(x).float().pow(2).mean()
        for acc, g in zip(grads64, torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)):
            acc += g.double()
        loss.backward()
    masters.finalize()
    if device.type == "cuda":
        torch.cuda.synchronize()
    u = max(ulps(v, r) for v, r in zip(masters.views, grads64))
    fused = masters._fused is not None
    masters.remove()
    # three bf16 gradients summed in FP32: at most a few ulps from the float64 sum
    return {f"MasterGrads hot path ({'MasterSet' if fused else 'fallback'})": (u <= 4, u)}


CASES = [case_dtypes, case_misaligned, case_nonfinite, case_stream_and_graph, case_masterset, case_launches]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    t0 = time.perf_counter()
    results, failed = {}, []
    for case in CASES:
        try:
            for name, (ok, u) in case(device, args.quick).items():
                results[name] = {"passed": bool(ok), "max_ulp": u}
                if not ok:
                    failed.append(name)
        except Exception as exc:  # noqa: BLE001 - a case that raises is a failed case, the others still run
            results[case.__name__] = {"passed": False, "error": f"{type(exc).__name__}: {exc}"}
            failed.append(case.__name__)
    record = {"device": str(device), "backend": ops.backend_for(device), "quick": args.quick,
              "seconds": round(time.perf_counter() - t0, 2), "cases": results, "failed": failed}
    text = json.dumps(record, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(f"smoke on {device} ({record['backend']}): {len(results) - len(failed)}/{len(results)} cases passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
