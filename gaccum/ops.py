"""The hot-path op ``torch.ops.gaccum.unscale_check_accumulate_``.

One op, two implementations behind it, so the Accumulator and the hook never
know which ran:

* CUDA tensors with the compiled module loaded: one fused multi-tensor launch
  (csrc/), which reads each gradient once and read-modify-writes each master.
* CPU tensors with ``gaccum._cpu`` built: its fused pass (csrc/cpu/accumulate.cpp), the same in one
  read of each gradient and one read-modify-write of each master.
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

import contextlib
from types import ModuleType
from typing import Optional, Sequence

import torch

from . import _ext
from ._checks import warn_user

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
    device = _check_scalars(found_inf, inv_scale, sq_norm)
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


def _check_scalars(found_inf: torch.Tensor, inv_scale: torch.Tensor, sq_norm: Optional[torch.Tensor]) -> torch.device:
    """found_inf, inv_scale and sq_norm: one-element float32 tensors on one device, which is returned."""
    for name, t in (("found_inf", found_inf), ("inv_scale", inv_scale), ("sq_norm", sq_norm)):
        if t is None:
            continue
        if t.dtype != torch.float32 or t.numel() != 1:
            raise TypeError(f"gaccum: {name} must be a one-element float32 tensor, got {t.dtype} with {t.numel()} elements")
    device = found_inf.device
    for name, t in (("inv_scale", inv_scale), ("sq_norm", sq_norm)):
        if t is not None and t.device != device:
            raise ValueError(f"gaccum: {name} is on {t.device} but found_inf is on {device}; keep them on one device")
    return device


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
    """Pure-PyTorch implementation: :func:`_cpu_update` on CPU, :func:`_fallback_no_sync` on a device
    (no host sync there, the eager chain GradScaler uses)."""
    if not grads:
        return
    if found_inf.device.type == "cpu":
        _cpu_update(grads, masters, found_inf, float(inv_scale), overwrite, sq_norm)
    else:
        _fallback_no_sync(grads, masters, found_inf, inv_scale, overwrite, sq_norm)
    if zero_grads:
        torch._foreach_zero_(grads)


def _cpu_update(grads: list[torch.Tensor], masters: list[torch.Tensor], found_inf: torch.Tensor, s: float,
                overwrite: bool, sq_norm: Optional[torch.Tensor]) -> None:
    """The CPU path: the fused pass (``gaccum._cpu``, one read of each gradient and one read-modify-write of
    each master, threads as torch's) for contiguous pairs of one layout; :func:`_cpu_chain` for the rest or
    when the module is not built. Same results bit for bit; the sum of squares may differ in its rounding."""
    ext = _ext.load_cpu()
    if ext is None:
        _cpu_chain(grads, masters, found_inf, s, overwrite, sq_norm)
        return
    fast_g, fast_m, slow_g, slow_m = _split_eligible(grads, masters)
    if fast_g:
        sq, non_finite = ext.accumulate(*pointer_tables(fast_g, fast_m), s, overwrite, torch.get_num_threads())
        if non_finite:
            found_inf.fill_(1.0)
        if sq_norm is not None:
            sq_norm.add_(sq)
    if slow_g:
        _cpu_chain(slow_g, slow_m, found_inf, s, overwrite, sq_norm)


_CHUNK = 1 << 18  # 1 MiB of FP32: a piece stays in cache between its update and its check


def _cpu_chain(grads: list[torch.Tensor], masters: list[torch.Tensor], found_inf: torch.Tensor, s: float,
               overwrite: bool, sq_norm: Optional[torch.Tensor]) -> None:
    """masters = (0 or masters) + float32(grads) * s, the product rounded first, then the check.

    Large tensors go piece by piece: the product into a reused 1 MiB FP32 buffer (one ``mul`` with a
    one-element FP32 tensor upcasts and multiplies in float32 in one pass), the add, then the piece's
    sum of squares while it is still in cache -- about one pass over memory (~2x a plain copy), where
    an update pass then a norm pass over the masters cost ~3x. Small tensors use foreach ops.
    ``add(alpha=s)`` is never used: on CPU it is a fused multiply-add. A sum of squares can overflow
    for huge finite values, so a non-finite one is re-checked exactly: no false positive reaches
    ``found_inf``.
    """
    big = [i for i, (g, m) in enumerate(zip(grads, masters))
           if g.numel() >= _CHUNK and g.is_contiguous() and m.is_contiguous()]
    taken = set(big)
    small = [i for i in range(len(grads)) if i not in taken]
    squares: list[torch.Tensor] = []  # one scalar per tensor, in the order `small + big`
    if small:
        gs, ms = [grads[i] for i in small], [masters[i] for i in small]
        if overwrite:
            torch._foreach_copy_(ms, gs)
            if s != 1.0:
                torch._foreach_mul_(ms, s)  # an exact copy, then one rounding: the rounded product
        elif s == 1.0:
            torch._foreach_add_(ms, gs)  # g * 1 is exact: nothing to round
        else:
            for g, m in zip(gs, ms):
                m.add_(g.to(torch.float32, copy=True).mul_(s))
        squares += [n.square() for n in torch._foreach_norm(ms)]
    if big:
        scale = torch.tensor([s], dtype=torch.float32)
        buf = torch.empty(_CHUNK, dtype=torch.float32)
        for i in big:
            gf, mf = grads[i].view(-1), masters[i].view(-1)
            sums = torch.empty((gf.numel() + _CHUNK - 1) // _CHUNK, dtype=torch.float32)
            for k, a in enumerate(range(0, gf.numel(), _CHUNK)):
                piece, gp = mf[a: a + _CHUNK], gf[a: a + _CHUNK]
                if overwrite:
                    torch.mul(gp, scale, out=piece)
                elif s == 1.0:
                    piece.add_(gp)
                else:
                    t = buf[: piece.numel()]
                    torch.mul(gp, scale, out=t)
                    piece.add_(t)
                torch.dot(piece, piece, out=sums[k])
            squares.append(sums.sum())
    per = torch.stack(squares)
    if not bool(torch.isfinite(per).all()):
        order = small + big
        for k in torch.nonzero(~torch.isfinite(per)).flatten().tolist():
            if not bool(torch.isfinite(masters[order[k]]).all()):
                found_inf.fill_(1.0)
                break
    if sq_norm is not None:
        sq_norm.add_(per.sum())


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


def _split_eligible(grads: Sequence[torch.Tensor], masters: Sequence[torch.Tensor]) -> tuple:
    """(grads, masters) a compiled pass takes -- dense pairs of one layout, walked as flat arrays -- and the
    rest (e.g. a channels_last gradient with a contiguous master), for the fallback."""
    fast_g, fast_m, slow_g, slow_m = [], [], [], []
    for g, m in zip(grads, masters):
        if g.stride() == m.stride() and _kernel_eligible(g, m):
            fast_g.append(g)
            fast_m.append(m)
        else:
            slow_g.append(g)
            slow_m.append(m)
    return fast_g, fast_m, slow_g, slow_m


# The host backend: csrc/'s kernel built against the CUDA emulation (gaccum._hostemu.build_module). When
# set, CPU tensors take the same kernel path CUDA tensors take -- the split into kernel-eligible and
# fallback tensors, the pointer tables, the launch call -- so that path runs, and is checked, in CI.
_HOST: dict[str, Optional[ModuleType]] = {"module": None}


def set_host_backend(module: Optional[ModuleType]) -> Optional[ModuleType]:
    """Route CPU tensors through ``module`` (an emulated ``_C``), or back to the fallback with None.

    Returns the previous module. For tests and benchmarks: the emulation runs every CUDA thread as a
    fiber, correct but far slower than the fallback.
    """
    prev, _HOST["module"] = _HOST["module"], module
    return prev


def _kernel_module(device: torch.device) -> Optional[ModuleType]:
    """The compiled module that serves ``device``, or None when the fallback runs there: on CUDA only when
    the module itself sees a device (a driver or architecture it cannot use shows as 0 devices to it)."""
    if device.type == "cuda":
        ext = _ext.load()
        return ext if ext is not None and _ext.usable_on_device(ext) else None
    if device.type == "cpu":
        return _HOST["module"]
    return None


def _stream(device: torch.device) -> int:
    if device.type != "cuda":
        return 0  # the emulated device has one synchronous stream
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch._C._cuda_getCurrentRawStream(index)


def _cuda_device(device: torch.device):
    """The device guard a launch needs on CUDA when the current device differs, nothing otherwise."""
    if device.type != "cuda" or device.index in (None, torch.cuda.current_device()):
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _kernel_path(ext: ModuleType, grads: Sequence[torch.Tensor], masters: Sequence[torch.Tensor],
                 found_inf: torch.Tensor, inv_scale: torch.Tensor, overwrite: bool, zero_grads: bool,
                 sq_norm: Optional[torch.Tensor]) -> None:
    """One launch for the tensors the kernel takes, the fallback for the rest."""
    fast_g, fast_m, slow_g, slow_m = _split_eligible(grads, masters)
    if fast_g:
        gp, mp, sizes, dtypes = pointer_tables(fast_g, fast_m)
        device = found_inf.device
        with _cuda_device(device):
            ext.unscale_check_accumulate(
                gp, mp, sizes, dtypes, inv_scale.data_ptr(), found_inf.data_ptr(),
                sq_norm.data_ptr() if sq_norm is not None else 0, overwrite, zero_grads, _stream(device),
            )
    if slow_g:
        _fallback(slow_g, slow_m, found_inf, inv_scale, overwrite, zero_grads, sq_norm)


def _dispatch(grads, masters, found_inf, inv_scale, overwrite, zero_grads, sq_norm) -> None:
    _validate(grads, masters, found_inf, inv_scale, sq_norm)
    ext = _kernel_module(found_inf.device)
    if ext is None or not grads:
        _fallback(list(grads), list(masters), found_inf, inv_scale, overwrite, zero_grads, sq_norm)
    else:
        _kernel_path(ext, grads, masters, found_inf, inv_scale, overwrite, zero_grads, sq_norm)


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
    _dispatch(grads, masters, found_inf, inv_scale, overwrite, zero_grads, sq_norm)


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
    _dispatch(grads, masters, found_inf, inv_scale, overwrite, zero_grads, sq_norm)


class FusedMasters:
    """The master-gradient hot path: one parameter set's masters registered with the kernel once.

    ``MasterGrads`` calls this once per bucket with indices and gradient pointers it collected in its
    post-accumulate hooks; everything that is fixed for the set -- the masters' pointers, sizes and
    layout, the gradients' dtypes (a ``.grad`` always has its parameter's dtype, shape and device),
    ``found_inf`` and ``inv_scale`` -- is validated here, once. The custom op stays the public,
    torch.compile-friendly entry; this skips its dispatch and per-call checks.
    """

    def __init__(self, ext: ModuleType, masters: Sequence[torch.Tensor], grad_dtypes: Sequence[torch.dtype],
                 found_inf: torch.Tensor, inv_scale: torch.Tensor) -> None:
        if len(grad_dtypes) != len(masters):
            raise ValueError(f"gaccum: {len(grad_dtypes)} gradient dtypes for {len(masters)} masters")
        device = _check_scalars(found_inf, inv_scale, None)
        for i, (m, dt) in enumerate(zip(masters, grad_dtypes)):
            if m.dtype != torch.float32 or m.device != device or not m.is_contiguous():
                raise ValueError(f"gaccum: master {i} must be a contiguous float32 tensor on {device}")
            if dt not in _GRAD_DTYPES:
                raise TypeError(f"gaccum: gradient {i} has dtype {dt}; expected float16, bfloat16 or float32")
        _check_disjoint(masters)
        self.device = device
        self._keep = (list(masters), found_inf, inv_scale)  # the registered pointers stay valid
        self._set = ext.MasterSet([m.data_ptr() for m in masters], [m.numel() for m in masters],
                                  [_GRAD_DTYPES[dt] for dt in grad_dtypes], inv_scale.data_ptr(),
                                  found_inf.data_ptr())

    def launch(self, index: list[int], grad_ptrs: list[int], overwrite: bool) -> None:
        """masters[index[k]] (+)= grad k * inv_scale for contiguous gradients at ``grad_ptrs``."""
        with _cuda_device(self.device):
            self._set.launch(index, grad_ptrs, overwrite, _stream(self.device))


def fused_masters(masters: Sequence[torch.Tensor], grad_dtypes: Sequence[torch.dtype], found_inf: torch.Tensor,
                  inv_scale: torch.Tensor) -> Optional[FusedMasters]:
    """The hot-path entry for ``masters``, or None where the fused kernel does not serve their device."""
    ext = _kernel_module(found_inf.device)
    if ext is None or not hasattr(ext, "MasterSet"):
        return None
    try:
        return FusedMasters(ext, masters, grad_dtypes, found_inf, inv_scale)
    except RuntimeError as exc:  # the module refused the set (a CUDA error there): the fallback serves it
        warn_user(f"gaccum: the fused CUDA kernel could not register the master gradients ({exc}); using the "
                  "PyTorch fallback", RuntimeWarning)
        return None


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
        if found_inf.is_cuda and torch.cuda.is_current_stream_capturing():
            raise ValueError("gaccum: inv_scale is a float inside CUDA-graph capture, which would copy it from the "
                             "host in the graph; pass inv_scale as a one-element float32 tensor on the device")
        inv_scale = torch.tensor([float(inv_scale)], dtype=torch.float32, device=found_inf.device)
    torch.ops.gaccum.unscale_check_accumulate_(
        list(grads), list(masters), found_inf, inv_scale, overwrite, zero_grads, sq_norm
    )


def backend_for(device: torch.device | str) -> str:
    """'cuda-kernel', 'host-emulation', 'cpu-kernel' or 'pytorch-fallback': which implementation would run
    on ``device`` for contiguous tensors."""
    device = torch.device(device)
    if device.type == "cuda" and _kernel_module(device) is not None:
        return "cuda-kernel"
    if device.type == "cpu" and _HOST["module"] is not None:
        return "host-emulation"
    if device.type == "cpu" and _ext.load_cpu() is not None:
        return "cpu-kernel"
    return "pytorch-fallback"
