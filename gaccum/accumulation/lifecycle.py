"""What gaccum installs on a model and an optimizer, and the one way it is all taken back.

:class:`Teardown` records an undo for everything installed (hooks, patched methods, the optimizer's
FP32 parameters, DDP's sync flag, the claim on the optimizer) and runs them in reverse, once:
``close()``, ``remove()``, a refused constructor and garbage collection all go through it.

:class:`BackwardWatch` notices a backward that raised: autograd runs an end-of-backward callback only
when the backward completes, so a gradient hook that fires in a new backward while the last one's
callback never ran means that backward failed part-way, leaving part of a micro-batch behind.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Optional

import torch


class Teardown:
    """Undo actions, run last-in first-out exactly once (``run`` is idempotent)."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self._finalizer: Optional[weakref.finalize] = None

    def add(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def handles(self, handles: list[Any]) -> list[Any]:
        """Hook handles, removed at teardown; returned for the caller's convenience."""
        for h in handles:
            self.add(h.remove)
        return handles

    def patch(self, obj: Any, name: str, fn: Any) -> Any:
        """Replace ``obj.name`` with ``fn`` on the instance; returns the original (bound) attribute."""
        original = getattr(obj, name)
        had_own = name in vars(obj)
        setattr(obj, name, fn)

        def undo() -> None:
            if had_own:
                setattr(obj, name, original)
            elif name in vars(obj):
                delattr(obj, name)

        self.add(undo)
        return original

    def claim(self, optimizer: Any, owner: Any) -> None:
        """Mark ``optimizer`` as driven by ``owner`` (weakly); released at teardown."""
        ref = weakref.ref(owner)
        optimizer._gaccum_owner = ref

        def release() -> None:
            if getattr(optimizer, "_gaccum_owner", None) is ref:
                optimizer._gaccum_owner = None

        self.add(release)

    def on_collect(self, owner: Any) -> None:
        """Run the teardown when ``owner`` is garbage collected (the undo list must not refer to it)."""
        self._finalizer = weakref.finalize(owner, self.run)
        self._finalizer.atexit = False

    def run(self) -> None:
        undo, self._undo = self._undo, []
        errors = []
        for fn in reversed(undo):
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - every undo runs; the first failure is re-raised after
                errors.append(exc)
        if self._finalizer is not None:
            self._finalizer.detach()
        if errors:
            raise errors[0]


def _graph_task_id() -> int:
    """The running backward's id (-1 outside backward); torch exposes it for torch.utils.checkpoint."""
    return torch._C._current_graph_task_id()


class BackwardWatch:
    """Tells, from inside a gradient hook, whether an earlier backward of this window raised part-way.

    ``seen()`` is called by every gradient hook: when the backward now running is a new one while the
    previous one never reached its end-of-backward callback, ``on_failure`` runs first (the core discards
    the window). ``on_complete`` callbacks run at the end of each backward that completes (the master
    gradients flush their last bucket there).
    """

    def __init__(self) -> None:
        self._task = -1
        self._open = False
        self.on_complete: list[Callable[[], None]] = []
        self.on_failure: Optional[Callable[[], None]] = None

    def seen(self) -> None:
        task = _graph_task_id()
        if self._open and task == self._task:
            return
        failed = self._open  # a new backward while the last one never completed
        self._open = False
        if failed and self.on_failure is not None:
            self.on_failure()
        self._task, self._open = task, True
        torch.autograd.Variable._execution_engine.queue_callback(self._completed)

    @property
    def open(self) -> bool:
        """A backward reached a gradient hook and has not completed (it is running, or it raised)."""
        return self._open

    def _completed(self) -> None:
        self._open = False
        for fn in self.on_complete:
            fn()

    def forget(self) -> None:
        """After the failure was handled: the failed backward's callback will never come."""
        self._open = False
