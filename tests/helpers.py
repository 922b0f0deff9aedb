"""Reference training loops the tests compare gaccum against, and a port for gloo ranks."""

import socket

import torch
from torch import nn
import torch.nn.functional as F


def large_batch_train(model, opt, batches, loss_fn=F.mse_loss, scheduler=None, max_grad_norm=None):
    """One optimizer step per (x, y) batch: the ground truth accumulation must match."""
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return model


def chunks(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]


def free_port():
    """A free loopback port for a test's own torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- an independent memory measure
def allocator_peak(fn, *existing):
    """Peak bytes while ``fn`` runs, read from the CPU allocator's own events (torch.profiler).

    Independent of gaccum's dispatch-level accounting: the profiler records
    every allocation and free the allocator makes. ``existing`` (modules,
    optimizers, tensors) is what was alive before, counted once per storage.
    """
    from torch.profiler import ProfilerActivity, profile

    seen, base = set(), 0

    def add(t):
        nonlocal base
        if t is None:
            return
        st = t.untyped_storage()
        if id(st) not in seen:
            seen.add(id(st))
            base += st.nbytes()

    for obj in existing:
        if isinstance(obj, nn.Module):
            for p in obj.parameters():
                add(p), add(p.grad)
            for b in obj.buffers():
                add(b)
        elif isinstance(obj, torch.optim.Optimizer):
            for g in obj.param_groups:
                for p in g["params"]:
                    add(p), add(p.grad)
            for s in obj.state.values():
                for v in s.values():
                    if torch.is_tensor(v):
                        add(v)
        elif torch.is_tensor(obj):
            add(obj)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return out, base + peak


def memtracker_peak(fn, model, opt):
    """Peak bytes of live tensors while ``fn`` runs, by torch's own MemTracker (no frozen parameters).

    For models whose CPU kernels allocate scratch the allocator sees but no
    tensor holds (oneDNN convolutions): the CPU planner counts tensors, as this does.
    """
    import warnings

    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with tracker:
            out = fn()
    return out, int(sum(v.get("Total", 0) for v in tracker.get_tracker_snapshot("peak").values()))


def steady_state_peak(model, opt, sample, loss_fn, b, windows=2, accum=2, measure="allocator"):
    """The peak of a plain training loop's last window, written as people write it.

    ``windows - 1`` windows run first (the optimizer's state exists from then
    on), then the last one is measured, by the CPU allocator's events
    (``measure="allocator"``) or torch's MemTracker (``"memtracker"``). The
    caller passes copies it may train.
    """
    held = {}

    def micro():
        held["batch"] = sample(b)  # as `for batch in loader:` does, the last batch is alive at the step
        loss_fn(model, held["batch"]).backward()

    def step():
        opt.step()
        opt.zero_grad(set_to_none=True)

    def window():
        for _ in range(accum):
            micro()
        step()

    for _ in range(windows - 1):
        window()
    if measure == "memtracker":  # one tracker per call: MemTracker follows one forward at a time
        return max(memtracker_peak(fn, model, opt)[1] for fn in [micro] * accum + [step])
    # The last batch is dropped first: the profiler reports freeing a block it saw allocated in an
    # earlier session, which would make this window's count short by a batch.
    held.clear()
    return allocator_peak(window, model, opt)[1]


def largest_under(peak_of, budget, cap):
    """Largest b in [1, cap] with peak_of(b) <= budget, by bisection (peaks grow with b)."""
    if peak_of(1) > budget:
        return 0
    if peak_of(cap) <= budget:
        return cap
    lo, hi = 1, cap
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if peak_of(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def window_plan(window):
    """A Plan with the given window, as gaccum.plan would return it (no probing: for weighting tests)."""
    import gaccum

    return gaccum.Plan(micro_batch_size=max(window), accum_steps=len(window), effective_batch_size=sum(window),
                       window=list(window), target_bs=sum(window), world_size=1, peak_memory=None,
                       memory_limit=1 << 30, headroom=0, device="cpu", amp=None)


class RaiseOnce(nn.Module):
    """An identity layer whose backward raises on the ``when``-th backward through it (a module backward hook)."""

    def __init__(self, when):
        super().__init__()
        self.count, self.when = 0, when
        self.register_full_backward_hook(self._hook)

    def forward(self, h):
        return h * 1.0

    def _hook(self, module, grad_in, grad_out):
        self.count += 1
        if self.count == self.when:
            raise RuntimeError("backward hook failed")
