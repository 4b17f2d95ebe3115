"""Run every ``benchmarks/bench_*.py`` module's ``main()`` in turn and print their tables.

Run from the repository root: ``python benchmarks/run.py [--quick] [--device cpu|cuda]
[--threads N] [--only NAME ...]``. ``--quick``, ``--device`` and ``--threads`` are passed on to
each module's ``main`` that accepts them (others are called with what they accept); without
``--threads`` each module sets its own default. A module
that fails is reported and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType

import torch

BENCHMARKS = Path(__file__).resolve().parent
REPOSITORY = BENCHMARKS.parent


def discover() -> list[Path]:
    """The benchmark modules, in name order."""
    return sorted(BENCHMARKS.glob("bench_*.py"))


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def describe_machine(device: str, threads: int) -> str:
    lines = [
        f"machine: {platform.machine()} {platform.processor() or platform.system()}, "
        f"{os.cpu_count()} CPUs ({usable_cpus()} usable by this process)",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"torch threads {threads} (a module whose main takes no threads sets its own)",
        f"device: {device}" + (f" ({torch.cuda.get_device_name(0)})" if device == "cuda" else ""),
    ]
    if hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
        lines.append(f"load average (1 min) at start: {load:.2f}")
        if load > usable_cpus() - 0.5:
            lines.append(
                "warning: other processes are using the CPUs; expect noisy figures, and "
                "much slower ones with more than 1 torch thread"
            )
    return "\n".join(lines)


def run_module(module: ModuleType, options: dict[str, object]) -> None:
    accepted = inspect.signature(module.main).parameters
    module.main(**{name: value for name, value in options.items() if name in accepted})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats: a smoke test")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="default: cuda when available",
    )
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads for every module (default: each module's own, 1 except "
             "for bench_flows, which uses all usable cores)",
    )
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="run only these modules (e.g. bench_vmf)"
    )
    arguments = parser.parse_args(argv)
    if arguments.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available")

    sys.path.insert(0, str(REPOSITORY))  # pyro_dgm from this checkout, without installing
    sys.path.insert(0, str(BENCHMARKS))  # their shared helpers (_timing)
    threads = arguments.threads or 1
    torch.set_num_threads(threads)
    print(describe_machine(arguments.device, torch.get_num_threads()))
    options = {
        "quick": arguments.quick,
        "device": arguments.device,
        "threads": arguments.threads,
    }
    paths = [p for p in discover() if not arguments.only or p.stem in arguments.only]
    failed = []
    for path in paths:
        print(f"\n{'=' * 30} {path.name} {'=' * 30}", flush=True)
        start = time.perf_counter()
        try:
            run_module(load(path), options)
        except Exception:
            traceback.print_exc()
            failed.append(path.name)
        torch.set_num_threads(threads)  # a module may have changed it
        print(f"({path.name}: {time.perf_counter() - start:.0f} s)", flush=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
