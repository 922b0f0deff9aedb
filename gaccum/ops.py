"""The hot-path op ``torch.ops.gaccum.unscale_check_accumulate_``.

One op, two implementations behind it, so the Accumulator and the hook never
know which ran:

* CUDA tensors with the compiled module loaded: one fused multi-tensor launch
  (csrc/), which reads each gradient once and read-modify-writes each master.
* Everything else: a pure-PyTorch implementation on ``torch._foreach_*`` ops.

Semantics (both implementations, bitwise):
``masters[i] = (0 if overwrite else masters[i]) + float32(grads[i]) * inv_scale``, the product rounded
to float32 before the sum (never a fused multiply-add: the kernel uses ``__fmul_rn``/``__fadd_rn``,
the fallback multiplies first), so an overflowing ``g * s`` is inf whatever ``m`` holds;
``found_inf`` (float32, one element, GradScaler's convention) is set to 1 when any
updated master is non-finite, which covers every inf/NaN in the gradients, and is
never cleared; with ``zero_grads`` the gradients are zeroed in the same pass; with
``sq_norm`` the sum of squares of the updated masters is added to it, so clipping
at the window boundary needs no extra pass.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _ext

_GRAD_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _validate(
    grads: Sequence[torch.Tensor],
    masters: Sequence[torch.Tensor],
    found_inf: torch.Tensor,
    inv_scale: torch.Tensor,
    sq_norm: Optional[torch.Tensor],
) -> None:
    if len(grads) != len(masters):
        raise ValueError(f"gaccum: {len(grads)} gradients but {len(masters)} masters; pass one master per gradient")
    for name, t in (("found_inf", found_inf), ("inv_scale", inv_scale), ("sq_norm", sq_norm)):
        if t is None:
            continue
        if t.dtype != torch.float32 or t.numel() != 1:
            raise TypeError(f"gaccum: {name} must be a one-element float32 tensor, got {t.dtype} with {t.numel()} elements")
    device = found_inf.device
    for name, t in (("inv_scale", inv_scale), ("sq_norm", sq_norm)):
        if t is not None and t.device != device:
            raise ValueError(f"gaccum: {name} is on {t.device} but found_inf is on {device}; keep them on one device")
    _check_disjoint(masters)
    for i, (g, m) in enumerate(zip(grads, masters)):
        if g.dtype not in _GRAD_DTYPES:
            raise TypeError(f"gaccum: gradient {i} has dtype {g.dtype}; expected float16, bfloat16 or float32")
        if m.dtype != torch.float32:
            raise TypeError(f"gaccum: master {i} has dtype {m.dtype}; masters must be float32")
        if g.shape != m.shape:
            raise ValueError(f"gaccum: gradient {i} has shape {tuple(g.shape)} but its master has {tuple(m.shape)}")
        if g.device != device or m.device != device:
            raise ValueError(
                f"gaccum: gradient {i} is on {g.device} and its master on {m.device}, found_inf on {device}; "
                "all tensors of one call must be on one device"
            )


def _check_disjoint(masters: Sequence[torch.Tensor]) -> None:
    """Two masters that share memory would race on a GPU (updates lost) and add twice anywhere."""
    spans = sorted((m.data_ptr(), m.data_ptr() + m.numel() * 4, i) for i, m in enumerate(masters) if m.numel())
    for (s0, e0, i), (s1, _, j) in zip(spans, spans[1:]):
        if s1 < e0:
            raise ValueError(f"gaccum: masters {min(i, j)} and {max(i, j)} overlap in memory; each master must be "
                             "its own memory (one per gradient, no duplicates)")


def _fallback(
    grads: list[torch.Tensor],
    masters: list[torch.Tensor],
    found_inf: torch.Tensor,
    inv_scale: torch.Tensor,
    overwrite: bool,
    zero_grads: bool,
    sq_norm: Optional[torch.Tensor],
) -> None:
    """Pure-PyTorch implementation.

    On CPU it is one mixed-dtype ``_foreach_add_`` (the upcast happens inside the
    add, no FP32 temporaries) and one ``_foreach_norm`` over the masters for the
    check: ~2x a plain copy, against ~20x for an upcast-unscale-check-add loop.
    The norm can overflow for huge finite values, so a non-finite norm is
    re-checked exactly: no false positive ever reaches ``found_inf``.
    On CUDA it avoids any host sync (the eager chain GradScaler uses).
    """
    if not grads:
        return
    if found_inf.device.type == "cpu":
        s = float(inv_scale)
        if overwrite:
            torch._foreach_copy_(masters, grads)
            if s != 1.0:
                torch._foreach_mul_(masters, s)
        elif s == 1.0:
            torch._foreach_add_(masters, grads)  # g * 1 is exact: nothing to round
        else:
            # add(alpha=s) is a fused multiply-add on CPU: round the product first, as the kernel does
            _add_scaled_unfused(masters, grads, s)
        norms = torch.stack(torch._foreach_norm(masters))
        if not bool(torch.isfinite(norms).all()):
            for i in torch.nonzero(~torch.isfinite(norms)).flatten().tolist():
                if not bool(torch.isfinite(masters[i]).all()):
                    found_inf.fill_(1.0)
                    break
        if sq_norm is not None:
            sq_norm.add_(norms.square().sum())
    else:
        _fallback_no_sync(grads, masters, found_inf, inv_scale, overwrite, sq_norm)
    if zero_grads:
        torch._foreach_zero_(grads)


_CHUNK = 1 << 18  # 1 MiB of FP32: the scratch stays in cache, so the extra passes cost little


def _add_scaled_unfused(masters: list[torch.Tensor], grads: list[torch.Tensor], s: float) -> None:
    """masters += float32(grads) * s, the product rounded first, through one small reused FP32 buffer
    (an FP32 copy of every gradient would cost ~4x a plain copy; this costs ~1.4x)."""
    buf = torch.empty(min(_CHUNK, max(g.numel() for g in grads)), dtype=torch.float32, device=masters[0].device)
    for g, m in zip(grads, masters):
        if not (g.is_contiguous() and m.is_contiguous()):
            m.add_(g.to(torch.float32, copy=True).mul_(s))
            continue
        gf, mf = g.view(-1), m.view(-1)
        for a in range(0, gf.numel(), _CHUNK):
            piece = mf[a: a + _CHUNK]
            t = buf[: piece.numel()]
            t.copy_(gf[a: a + _CHUNK])
            t.mul_(s)
            piece.add_(t)


def _fallback_no_sync(grads: list[torch.Tensor], masters: list[torch.Tensor], found_inf: torch.Tensor,
                      inv_scale: torch.Tensor, overwrite: bool, sq_norm: Optional[torch.Tensor]) -> None:
    """The device-side fallback (CUDA tensors the kernel does not take): no host sync anywhere.

    found_inf is set from the *updated masters*, as the kernel does: an overflow of g * s, of m + g,
    and a master that was already non-finite are caught, not only an inf/NaN in the gradient.
    """
    up = [g.to(torch.float32, copy=True) for g in grads]
    torch._foreach_mul_(up, inv_scale.reshape(()))  # a 0-dim tensor: no host sync
    if overwrite:
        torch._foreach_copy_(masters, up)
    else:
        torch._foreach_add_(masters, up)
    del up
    one = torch.ones((), dtype=torch.float32, device=found_inf.device)
    torch._amp_foreach_non_finite_check_and_unscale_(masters, found_inf, one)  # checks; x 1 changes nothing
    if sq_norm is not None:
        sq_norm.add_(torch.stack(torch._foreach_norm(masters)).square().sum())


def pointer_tables(grads: list[torch.Tensor], masters: list[torch.Tensor]) -> tuple:
    """The kernel's tables, built for this call: pointers, sizes and dtype codes.

    Never cached across calls: a tensor can keep its identity while its storage
    changes (``.data =``, ``set_``, FSDP resizing a shard), and a stale pointer
    is an out-of-bounds write on a GPU; nor are the tensors held after the call.
    """
    return ([g.data_ptr() for g in grads], [m.data_ptr() for m in masters], [g.numel() for g in grads],
            [_GRAD_DTYPES[g.dtype] for g in grads])


def _kernel_eligible(g: torch.Tensor, m: torch.Tensor) -> bool:
    if g.is_contiguous() and m.is_contiguous():
        return True
    cl = torch.channels_last if g.dim() == 4 else None
    return cl is not None and g.is_contiguous(memory_format=cl) and m.is_contiguous(memory_format=cl)


@torch.library.custom_op(
    "gaccum::unscale_check_accumulate_",
    mutates_args=("grads", "masters", "found_inf", "sq_norm"),
)
def _op(
    grads: list[torch.Tensor],
    masters: list[torch.Tensor],
    found_inf: torch.Tensor,
    inv_scale: torch.Tensor,
    overwrite: bool = False,
    zero_grads: bool = False,
    sq_norm: Optional[torch.Tensor] = None,
) -> None:
    _validate(grads, masters, found_inf, inv_scale, sq_norm)
    _fallback(list(grads), list(masters), found_inf, inv_scale, overwrite, zero_grads, sq_norm)


@_op.register_kernel("cuda")
def _op_cuda(
    grads: list[torch.Tensor],
    masters: list[torch.Tensor],
    found_inf: torch.Tensor,
    inv_scale: torch.Tensor,
    overwrite: bool = False,
    zero_grads: bool = False,
    sq_norm: Optional[torch.Tensor] = None,
) -> None:
    _validate(grads, masters, found_inf, inv_scale, sq_norm)
    ext = _ext.load()
    if ext is None or not grads:
        _fallback(list(grads), list(masters), found_inf, inv_scale, overwrite, zero_grads, sq_norm)
        return
    fast_g, fast_m, slow_g, slow_m = [], [], [], []
    for g, m in zip(grads, masters):
        if g.stride() == m.stride() and _kernel_eligible(g, m):
            fast_g.append(g)
            fast_m.append(m)
        else:  # e.g. a channels_last gradient with a contiguous master
            slow_g.append(g)
            slow_m.append(m)
    if fast_g:
        gp, mp, sizes, dtypes = pointer_tables(fast_g, fast_m)
        with torch.cuda.device(found_inf.device):
            stream = torch.cuda.current_stream(found_inf.device).cuda_stream
            ext.unscale_check_accumulate(
                gp, mp, sizes, dtypes, inv_scale.data_ptr(), found_inf.data_ptr(),
                sq_norm.data_ptr() if sq_norm is not None else 0, overwrite, zero_grads, stream,
            )
    if slow_g:
        _fallback(slow_g, slow_m, found_inf, inv_scale, overwrite, zero_grads, sq_norm)


@_op.register_fake
def _op_fake(grads, masters, found_inf, inv_scale, overwrite=False, zero_grads=False, sq_norm=None) -> None:
    return None


def unscale_check_accumulate_(
    grads: Sequence[torch.Tensor],
    masters: Sequence[torch.Tensor],
    found_inf: torch.Tensor,
    inv_scale: torch.Tensor | float = 1.0,
    *,
    overwrite: bool = False,
    zero_grads: bool = False,
    sq_norm: Optional[torch.Tensor] = None,
) -> None:
    """Python entry point: accepts a float ``inv_scale`` and any sequence type."""
    if not isinstance(inv_scale, torch.Tensor):
        inv_scale = torch.tensor([float(inv_scale)], dtype=torch.float32, device=found_inf.device)
    torch.ops.gaccum.unscale_check_accumulate_(
        list(grads), list(masters), found_inf, inv_scale, overwrite, zero_grads, sq_norm
    )


def backend_for(device: torch.device | str) -> str:
    """'cuda-kernel' or 'pytorch-fallback': which implementation would run on ``device``."""
    device = torch.device(device)
    if device.type == "cuda" and _ext.load(quiet=True) is not None:
        return "cuda-kernel"
    return "pytorch-fallback"
