"""The plan cache: a plan found once is reused while nothing that changes the answer changed.

The key holds everything the probes' outcome depends on: the model's structure,
parameter shapes, dtypes and which are trainable, gradient checkpointing where
the model says (Hugging Face's ``is_gradient_checkpointing``, ``is_activation_checkpointing`` since 5), the batch's
shapes, the optimizer's kind and hyper-parameters, the master-gradient choice,
AMP, the device, limit, headroom, world size, the window's shape, the
objective, and the torch and gaccum versions. The optimizer's current state is
not in it: probes always run with the state warm, so it does not change them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .._ext import cache_dir
from .._version import __version__


def cache_path() -> Path:
    return cache_dir() / "plans.json"


def checkpointing(model: nn.Module) -> Any:
    """What the model says about gradient checkpointing, for every submodule that says it."""
    seen = []
    for name, m in model.named_modules():
        # transformers 5 renamed the flag; asking for the old name there warns
        attr = "is_activation_checkpointing" if hasattr(type(m), "is_activation_checkpointing") else "is_gradient_checkpointing"
        flag = getattr(m, attr, None)
        if isinstance(flag, bool):
            seen.append((name, flag))
        elif getattr(m, "gradient_checkpointing", None) in (True, False):
            seen.append((name, bool(m.gradient_checkpointing)))
    return seen


def plan_key(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], **settings: Any) -> str:
    params = [(n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in model.named_parameters()]
    blob = json.dumps([repr(model), params, checkpointing(model), type(optimizer).__name__,
                       {k: repr(v) for k, v in getattr(optimizer, "defaults", {}).items()}, sorted(settings.items()),
                       torch.__version__, __version__], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def load(key: str) -> Optional[dict[str, Any]]:
    try:
        return json.loads(cache_path().read_text()).get(key)
    except (OSError, ValueError):
        return None


def store(key: str, plan_dict: dict[str, Any]) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.loads(path.read_text()) if path.exists() else {}
        data[key] = plan_dict
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except Exception:  # noqa: BLE001 - a cache that cannot be written (full disk, no memory) costs probes next
        pass  # time, never the plan
