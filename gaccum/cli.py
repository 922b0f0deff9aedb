"""``gaccum`` command line: ``gaccum plan FACTORY --target-bs N`` and ``gaccum demo``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence


def load_factory(spec: str) -> Any:
    """``module:function`` or ``path/to/file.py:function``."""
    if ":" not in spec:
        raise ValueError(f"gaccum: expected MODULE_OR_FILE:FACTORY, got {spec!r}")
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py") or Path(target).is_file():
        path = Path(target)
        if not path.is_file():
            raise ValueError(f"gaccum: no such file {target!r}")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        assert mod_spec is not None and mod_spec.loader is not None
        module = importlib.util.module_from_spec(mod_spec)
        sys.path.insert(0, str(path.parent.resolve()))
        mod_spec.loader.exec_module(module)
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))  # `gaccum plan mymod:make` finds mymod.py here, as python -m would
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise ValueError(f"gaccum: cannot import {target!r} ({exc}); pass a module on the Python path or "
                             f"a file, e.g. path/to/{target.replace('.', '/')}.py:{name}") from exc
    if not hasattr(module, name):
        raise ValueError(f"gaccum: {target} has no attribute {name!r}")
    factory = getattr(module, name)
    if not callable(factory):
        raise ValueError(f"gaccum: {spec} is a {type(factory).__name__}, not a function; {FACTORY_RETURNS}")
    return factory


FACTORY_RETURNS = (
    "a factory must return (model, sample, loss_fn) or (model, sample, loss_fn, optimizer), or a dict with "
    "'model', 'sample' (b -> a batch of b samples, the longest the data holds) and 'loss_fn' "
    "((model, batch) -> scalar loss), optionally 'optimizer'"
)


def _unpack(made: Any) -> tuple:
    import torch

    if isinstance(made, dict):
        missing = [k for k in ("model", "sample", "loss_fn") if k not in made]
        if missing:
            raise ValueError(f"gaccum: the factory's dict has no {', '.join(map(repr, missing))}; {FACTORY_RETURNS}")
        return made["model"], made["sample"], made["loss_fn"], made.get("optimizer")
    if isinstance(made, torch.nn.Module) or not isinstance(made, (tuple, list)) or not 3 <= len(made) <= 4:
        got = type(made).__name__ + (f" of {len(made)}" if isinstance(made, (tuple, list)) else "")
        raise ValueError(f"gaccum: the factory returned a {got}; {FACTORY_RETURNS}")
    return tuple(list(made) + [None])[:4]


def _headroom(text: str) -> Any:
    """'0.1' is a fraction, '512MiB' or '1048576' bytes: the same rule as plan(headroom=...)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _device(text: Optional[str]) -> Optional[str]:
    if text is None or text == "meta":
        return text
    import torch

    try:
        torch.device(text)
    except RuntimeError as exc:
        raise ValueError(f"gaccum: --device {text!r} is not a torch device; use cpu, cuda, cuda:N or meta") from exc
    return text


def _cmd_plan(args: argparse.Namespace) -> int:
    from .planner import plan

    args.device = _device(args.device)
    factory = load_factory(args.factory)
    model, sample, loss_fn, opt = _unpack(factory())
    p = plan(model, target_bs=args.target_bs, sample=sample, loss_fn=loss_fn, optimizer=opt, amp=args.amp,
             device=args.device, memory_limit=args.memory_limit, headroom=_headroom(args.headroom),
             uneven=args.uneven, refresh=args.refresh, objective=args.objective, soak=args.soak)
    print(json.dumps(p.to_dict(), indent=2) if args.json else p)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="gaccum", description="Plan micro-batches and accumulate gradients exactly.")
    parser.add_argument("--version", action="version", version=f"gaccum {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("plan", help="find the largest micro-batch that fits and the accumulation window")
    pp.add_argument("factory", help="MODULE_OR_FILE:FACTORY returning (model, sample, loss_fn, optimizer)")
    pp.add_argument("--target-bs", type=int, required=True)
    pp.add_argument("--memory-limit", default=None, help="e.g. 8GiB (required on CPU)")
    pp.add_argument("--headroom", default="0.05", help="kept free: a fraction (0.05) or bytes (512MiB); default 0.05")
    pp.add_argument("--soak", type=int, default=0, help="train N real micro-steps at the chosen size first")
    pp.add_argument("--amp", choices=["bf16", "fp16"], default=None)
    pp.add_argument("--device", default=None, help="'meta' to estimate without the device")
    pp.add_argument("--uneven", action="store_true", help="full micro-batches and a short last one")
    pp.add_argument("--objective", choices=["memory", "throughput"], default="memory")
    pp.add_argument("--refresh", action="store_true", help="ignore the plan cache")
    pp.add_argument("--json", action="store_true")
    pp.set_defaults(fn=_cmd_plan)
    from .demo.run import add_arguments, run_demo

    pd = sub.add_parser("demo", help="plan and train a small GPT on the bundled corpus, write a report")
    add_arguments(pd)
    pd.set_defaults(fn=run_demo)
    args = parser.parse_args(argv)
    from .planner import PlanError

    try:
        return int(args.fn(args) or 0)
    except (ValueError, TypeError, PlanError, OSError) as exc:  # the user's input: one line, exit 2
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
