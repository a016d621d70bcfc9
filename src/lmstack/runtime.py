"""The runtime choices every layer shares: seeding, the device, the compute dtype, CPU threads."""

from __future__ import annotations

import dataclasses
import functools
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmstack.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "mps")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); return a CPU generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda > mps > cpu; an explicit device that is not available is a user error."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ConfigError(f"device: unknown device {name!r}; use one of {', '.join(DEVICES)} or cuda:N")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device: 'mps' requested but MPS is not available; use --device cpu or auto")
    return torch.device(name)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """Map a dtype name from a config (``bf16``, ``float32``...) to a torch dtype."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"dtype: unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


# ---------------------------------------------------------------------------------------------------------
# matmul peak and the hardware-honest dtype


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None,
                        repeats: int = 5, budget_s: float = 1.0) -> float:
    """FLOP/s of a square matmul on ``device`` (median of ``repeats``): the practical peak MFU is quoted against.

    A dtype the device emulates (bf16 on a CPU without native bf16 runs ~100x below fp32) would make this
    take many seconds, so timing stops once ``budget_s`` is spent; a single run that is slow on its own
    is measurement enough (its warm-up overhead is small against it).
    """
    n = n or (8192 if device.type == "cuda" else 1024)
    gen = torch.Generator().manual_seed(0)  # never the global RNG: a resumed run must draw what the original drew
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    times: list[float] = []
    spent = 0.0
    for i in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        (a @ b).sum().item() if device.type != "cpu" else a @ b
        _sync(device)
        elapsed = time.perf_counter() - t0
        if i:  # the first run warms up
            times.append(elapsed)
        spent += elapsed
        if spent > budget_s:
            times = times or [elapsed]
            break
    return 2 * n**3 / statistics.median(times)


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (``/proc/cpuinfo``); empty where there is no such file."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_native_bf16() -> str | None:
    """The CPU's native bf16 matmul unit (``"AMX-BF16"``, ``"AVX512-BF16"``), or None when bf16 is emulated."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "AMX-BF16"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    cap = torch.backends.cpu.get_cpu_capability().upper()  # some builds name AMX here
    return "AMX" if "AMX" in cap else None


@functools.cache
def matmul_speeds(dtype: torch.dtype, threads: int | None = None) -> tuple[float, float]:
    """(FLOP/s in ``dtype``, FLOP/s in fp32) of a 512x512 CPU matmul: the short probe (a few ms with native
    bf16, ~0.3 s where bf16 is emulated at ~1 GFLOP/s; cached per process and thread count) that decides
    whether a low-precision dtype is really fast here."""
    cpu = torch.device("cpu")
    return (measure_matmul_peak(cpu, dtype, n=512, repeats=3, budget_s=0.1),
            measure_matmul_peak(cpu, torch.float32, n=512, repeats=3, budget_s=0.1))


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class DtypeChoice:
    """What ``resolve_dtype`` chose: the torch dtype, its short name, why, and a warning (or None)."""

    dtype: torch.dtype
    name: str
    reason: str
    warning: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"dtype": self.name, "reason": self.reason, **({"warning": self.warning} if self.warning else {})}


_announced: set[str] = set()


def resolve_dtype(name: str, device: torch.device, announce: bool = True) -> DtypeChoice:
    """The compute dtype for ``name`` on ``device``: the one rule every layer uses.

    ``auto`` is bf16 only where bf16 matmuls are really fast: CUDA with bf16 support, or a CPU with AMX or
    AVX512-BF16 whose probe (:func:`matmul_speeds`) runs bf16 at least ~90% as fast as fp32; fp32
    everywhere else (MPS included). An explicit low-precision dtype is honoured, with a warning carrying the
    measured slowdown when the CPU emulates it. ``announce`` prints the choice (and the warning) to stderr
    once per process.
    """
    if name == "auto":
        choice = _auto_dtype(device)
    else:
        dtype = parse_dtype(name)
        choice = DtypeChoice(dtype, DTYPE_NAMES[dtype], f"{DTYPE_NAMES[dtype]} requested")
        if device.type == "cpu" and dtype != torch.float32:
            low, fp32 = matmul_speeds(dtype, torch.get_num_threads())
            if low < 0.9 * fp32:
                choice = dataclasses.replace(choice, warning=(
                    f"{choice.name} matmul ran {fp32 / low:.3g}x slower than fp32 here ({low / 1e9:.4g} vs "
                    f"{fp32 / 1e9:.4g} GFLOP/s); use dtype=auto or fp32"))
    if announce:
        line = f"[dtype] {name} -> {choice.name} on {device.type}: {choice.reason}"
        for msg in (line, f"warning: {choice.warning}" if choice.warning else None):
            if msg and msg not in _announced:
                _announced.add(msg)
                print(msg, file=sys.stderr)
    return choice


def _auto_dtype(device: torch.device) -> DtypeChoice:
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return DtypeChoice(torch.bfloat16, "bf16", "CUDA device with bf16 support")
        return DtypeChoice(torch.float32, "fp32", "CUDA device without bf16 support")
    if device.type != "cpu":
        return DtypeChoice(torch.float32, "fp32", f"{device.type}: fp32 unless asked")
    unit = cpu_native_bf16()
    if unit is None:
        return DtypeChoice(torch.float32, "fp32", "CPU without native bf16 (no AMX/AVX512-BF16 flag)")
    low, fp32 = matmul_speeds(torch.bfloat16, torch.get_num_threads())
    speeds = f"bf16 {low / 1e9:.4g} vs fp32 {fp32 / 1e9:.4g} GFLOP/s"
    if low >= 0.9 * fp32:
        return DtypeChoice(torch.bfloat16, "bf16", f"CPU with {unit}, probe: {speeds}")
    return DtypeChoice(torch.float32, "fp32", f"CPU with {unit} but bf16 is not faster, probe: {speeds}")


def default_dtype(device: torch.device) -> torch.dtype:
    """The compute dtype that suits a device (``resolve_dtype("auto", device)``, silently)."""
    return resolve_dtype("auto", device, announce=False).dtype


# ---------------------------------------------------------------------------------------------------------
# CPU threads


def resolve_threads(threads: int | str = "auto") -> int:
    """The CPU thread count for ``threads``: a positive int as given; ``auto`` = ``OMP_NUM_THREADS`` when it
    is set to a positive integer, else the cores this process may run on (its affinity mask, which is what
    taskset, cgroups-aware launchers and SLURM restrict; ``os.cpu_count()`` would count the whole machine)."""
    if threads != "auto":
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads: must be 'auto' or a positive integer, got {threads!r}")
        return threads
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


# below this an fp32 matmul is starved (a busy or oversubscribed core); a modern core does 20-100 GFLOP/s
LOW_PEAK_PER_THREAD = 5e9


def low_peak_warning(peak: float, threads: int) -> str | None:
    """A warning when a measured CPU fp32 matmul peak is implausibly low for ``threads`` threads."""
    if peak >= LOW_PEAK_PER_THREAD * threads:
        return None
    hint = "set threads = 1, or " if threads > 1 else ""
    return (f"the matmul peak measured {peak / 1e9:.3g} GFLOP/s on {threads} thread(s), under "
            f"{LOW_PEAK_PER_THREAD / 1e9:.0f} GFLOP/s per thread: another process is likely busy on these cores; "
            f"{hint}check `top` for a busy core")
