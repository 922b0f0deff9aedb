"""The few FSDP2 (``fully_shard``) calls gaccum makes, in one place."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from torch import nn


def fsdp_root(model: nn.Module) -> Optional[nn.Module]:
    """The outermost FSDP2 module, if the model has one."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None
    return next((m for m in model.modules() if isinstance(m, FSDPModule)), None)


@contextlib.contextmanager
def gradient_sync(root: Any, sync: bool) -> Iterator[None]:
    """FSDP2's no_sync: gradients accumulate unsharded and unreduced until a micro-step that syncs."""
    root.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


class UnreachableFSDPState(RuntimeError):
    """This torch's FSDP2 keeps a window's unreduced gradients where gaccum cannot reach them."""


def _fsdp_params(root: nn.Module) -> list[Any]:
    """FSDP2's per-parameter records (FSDPParam) under ``root``, in module order, each once.

    A window's micro-steps that did not sync leave their gradient here, unsharded and unreduced
    (``unsharded_accumulated_grad``, or the unsharded parameter's ``.grad`` when no reduce dtype is set).
    FSDP2 has no public API for that state, so this is the one place gaccum reads FSDP2's internals;
    if they move, checkpointing mid-window fails with a clear error and nothing else does.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    seen: set[int] = set()
    out: list[Any] = []
    for module in root.modules():
        if not isinstance(module, FSDPModule):
            continue
        try:
            state = module._get_fsdp_state()
            groups = getattr(state, "_fsdp_param_groups", None)
            if groups is None:
                group = state._fsdp_param_group
                groups = [] if group is None else [group]
        except AttributeError as exc:
            raise UnreachableFSDPState(f"gaccum: this torch's FSDP2 has no per-parameter state where gaccum looks "
                                       f"({exc}); checkpoint at a window boundary") from exc
        for group in groups:
            if id(group) in seen:
                continue
            seen.add(id(group))
            for fp in group.fsdp_params:
                if not hasattr(fp, "unsharded_accumulated_grad"):
                    raise UnreachableFSDPState("gaccum: this torch's FSDP2 keeps unreduced gradients where gaccum "
                                               "cannot reach them; checkpoint at a window boundary")
                out.append(fp)
    return out


def unreduced_grads(root: nn.Module) -> list[Optional[torch.Tensor]]:
    """Copies of the window so far as FSDP2 holds it on this rank: each parameter's unreduced gradient."""
    out: list[Optional[torch.Tensor]] = []
    for fp in _fsdp_params(root):
        g = fp.unsharded_accumulated_grad
        if g is None:
            unsharded = getattr(fp, "_unsharded_param", None)
            g = None if unsharded is None else unsharded.grad
        out.append(None if g is None else g.detach().clone())
    return out


def check_unreduced_grads(root: nn.Module, grads: list[Optional[torch.Tensor]]) -> list[Any]:
    """The FSDPParams ``grads`` would load into; a ValueError, before anything changes, if they do not fit."""
    fps = _fsdp_params(root)
    if len(fps) != len(grads):
        raise ValueError(f"gaccum: the checkpoint holds unreduced gradients for {len(grads)} FSDP2 parameters, "
                         f"this model has {len(fps)}")
    for i, (fp, g) in enumerate(zip(fps, grads)):
        if g is not None and tuple(g.shape) != tuple(fp._orig_size):
            raise ValueError(f"gaccum: unreduced gradient {i} has shape {tuple(g.shape)}, the parameter "
                             f"{tuple(fp._orig_size)}")
    return fps


def load_unreduced_grads(fsdp_params: list[Any], grads: list[Optional[torch.Tensor]]) -> None:
    """Put a window's unreduced gradients back where FSDP2 adds the next micro-steps to them.

    ``fsdp_params`` is what :func:`check_unreduced_grads` returned for them. They go to
    ``unsharded_accumulated_grad``: FSDP2's post-backward adds each later micro-step's unsharded
    gradient into it (one addition, as autograd's own accumulation would make) and reduce-scatters it
    on the micro-step that syncs.
    """
    for fp, g in zip(fsdp_params, grads):
        unsharded = getattr(fp, "_unsharded_param", None)
        if unsharded is not None:
            unsharded.grad = None
        fp.unsharded_accumulated_grad = None if g is None else g.to(fp.device).clone()
