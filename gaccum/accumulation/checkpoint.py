"""One checkpoint format for every front-end: the window so far, the counters, the FP32 masters.

``load`` checks everything before assigning anything: a checkpoint that does not fit changes nothing.
A mid-window checkpoint must be loaded where the window means the same: the same ``accum_steps`` and
the same use of a GradScaler (its gradients are multiplied by the loss scale).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .core import AccumulationCore

FORMAT = 2
_WINDOW = ("accum_steps", "micro", "items", "items_mode", "ref_total", "last_synced")
_COUNTERS = ("optimizer_steps", "skipped_steps", "micro_steps", "skipped_micro_batches")
GradList = list[Optional[torch.Tensor]]


def save(core: AccumulationCore, grads: Callable[[], GradList]) -> dict[str, Any]:
    """``grads()``: the window's gradient of each of ``core.params`` (without FP32 masters)."""
    w = core.window
    state: dict[str, Any] = {k: getattr(w, k) for k in _WINDOW}
    state.update({k: getattr(core, k) for k in _COUNTERS})
    state.update(format=FORMAT, epoch=core.epoch, micro_batch_limit=core.micro_batch_limit,
                 oom_splits=core.oom_splits, discarded_windows=core.discarded_windows,
                 loss_scale=float(core.scaler.get_scale()) if core.scaler is not None else None)
    if core.masters is not None:
        assert core.master_weights is not None
        core.masters.flush_pending()
        state["master_grads"] = core.masters.flat.detach().clone()
        state["written"] = list(core.masters.written)
        state["master_weights"] = [wt.detach().clone() for wt in core.master_weights.weights]
        # optimizer.state_dict() of a model with half parameters is cast to their dtype when loaded
        # before the Accumulator exists: the FP32 state travels here too, so resume is exact
        state["optimizer_fp32_state"] = core.master_weights.fp32_state()
    else:
        state["grads"] = [None if g is None else g.detach().clone() for g in grads()]
    return state


def check(core: AccumulationCore, state: Any) -> None:
    """Every reason ``state`` cannot be loaded into ``core``, raised before anything is assigned."""
    if not isinstance(state, dict):
        raise TypeError(f"gaccum: load_state_dict takes the dict that state_dict() returned, got "
                        f"{type(state).__name__}")
    missing = [k for k in (*_WINDOW, *_COUNTERS) if k not in state]
    if missing:
        raise ValueError(f"gaccum: not an Accumulator/hook state_dict (missing {missing})")
    if ("master_grads" in state) != (core.masters is not None):
        raise ValueError("gaccum: the checkpoint and this Accumulator disagree on master_grads; build it the same way")
    if state["micro"]:
        _check_mid_window(core, state)
    if core.masters is not None:
        assert core.master_weights is not None
        if state["master_grads"].numel() != core.masters.flat.numel():
            raise ValueError("gaccum: the checkpoint's master gradients do not match this model's parameters")
        ws = core.master_weights.weights
        if len(state["master_weights"]) != len(ws) or any(
                tuple(a.shape) != tuple(b.shape) for a, b in zip(state["master_weights"], ws)):
            raise ValueError("gaccum: the checkpoint's master weights do not match this model's parameters")
    else:
        grads = state["grads"]
        if len(grads) != len(core.params) or any(
                g is not None and tuple(g.shape) != tuple(p.shape) for g, p in zip(grads, core.params)):
            raise ValueError("gaccum: the checkpoint's gradients do not match this model's parameters")


def _check_mid_window(core: AccumulationCore, state: dict[str, Any]) -> None:
    micro, saved = state["micro"], state["accum_steps"]
    if core.schedule is None and saved != core.accum_steps:
        raise ValueError(
            f"gaccum: this checkpoint was taken mid-window ({micro} of {saved} micro-steps) with accum_steps={saved}; "
            f"this one has accum_steps={core.accum_steps}. Build it with accum_steps={saved} to finish that window, "
            "or save at a window boundary (acc.micro_in_window == 0) to change it")
    if "loss_scale" in state and (state["loss_scale"] is None) != (core.scaler is None):
        had = "with" if state["loss_scale"] is not None else "without"
        raise ValueError(
            f"gaccum: this checkpoint was taken mid-window {had} a GradScaler, so its gradients are "
            f"{'multiplied by the loss scale' if state['loss_scale'] is not None else 'unscaled'}; load it into an "
            f"Accumulator/hook {had} one (and load the scaler's own state_dict), or save at a window boundary")


def load(core: AccumulationCore, state: dict[str, Any], put_grads: Callable[[GradList], None]) -> None:
    """Assign a checked ``state``; ``put_grads`` places the window's gradients (without FP32 masters)."""
    w = core.window
    if core.masters is not None:
        assert core.master_weights is not None
        core.masters.drop_pending()
        with torch.no_grad():
            core.masters.flat.copy_(state["master_grads"])
            for wt, src in zip(core.master_weights.weights, state["master_weights"]):
                wt.copy_(src)
        if "optimizer_fp32_state" in state:
            core.master_weights.load_fp32_state(state["optimizer_fp32_state"])
        core.masters.written = list(state["written"])
        core.master_weights.copy_back()
    else:
        put_grads([None if g is None else g.to(device=p.device, dtype=p.dtype).clone()
                   for p, g in zip(core.params, state["grads"])])
    mid = bool(state["micro"])
    for k in _WINDOW:
        if k != "accum_steps" or mid or core.schedule is not None:
            setattr(w, k, state[k])
    if not mid and core.schedule is None and state["accum_steps"] != core.accum_steps and not w.fixed_ref:
        w.ref_total = None  # between windows the new accum_steps is taken: R follows it
    w.loaded()
    for k in _COUNTERS:
        setattr(core, k, state[k])
    core.epoch = int(state.get("epoch", 0))
    core.micro_batch_limit = state.get("micro_batch_limit")
    core.oom_splits = int(state.get("oom_splits", 0))
    core.discarded_windows = int(state.get("discarded_windows", 0))
