"""The few FSDP2 (``fully_shard``) calls gaccum makes, in one place."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

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
