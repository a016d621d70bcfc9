"""The runtime choices: the hardware-honest dtype (both CPU branches, by patching the flags and the probe),
the thread count, and the low-peak warning."""

from __future__ import annotations

import pytest
import torch

from lmstack import runtime
from lmstack.errors import ConfigError
from lmstack.runtime import DtypeChoice, low_peak_warning, parse_dtype, resolve_dtype, resolve_threads

CPU = torch.device("cpu")


@pytest.fixture
def cpu_like(monkeypatch):
    """Make this process look like a CPU with the given flags and probe speeds (FLOP/s)."""
    monkeypatch.setattr(runtime, "_announced", set())

    def set_cpu(flags: set[str], bf16: float, fp32: float):
        monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr(runtime.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
        calls = []

        def speeds(dtype, threads=None):
            calls.append(dtype)
            return bf16, fp32

        monkeypatch.setattr(runtime, "matmul_speeds", speeds)
        return calls

    return set_cpu


def test_auto_is_fp32_on_an_avx2_only_cpu_without_probing(cpu_like, capsys):
    calls = cpu_like({"avx", "avx2", "fma"}, bf16=0.9e9, fp32=85e9)
    choice = resolve_dtype("auto", CPU)
    assert (choice.dtype, choice.name, choice.warning) == (torch.float32, "fp32", None)
    assert choice.reason == "CPU without native bf16 (no AMX/AVX512-BF16 flag)"
    assert calls == []                                     # no flag, no probe: nothing to confirm
    assert capsys.readouterr().err == ("[dtype] auto -> fp32 on cpu: CPU without native bf16 "
                                       "(no AMX/AVX512-BF16 flag)\n")


def test_auto_is_bf16_on_an_amx_cpu_whose_probe_confirms(cpu_like):
    calls = cpu_like({"avx2", "avx512f", "amx_tile", "amx_bf16"}, bf16=700e9, fp32=380e9)
    choice = resolve_dtype("auto", CPU)
    assert (choice.dtype, choice.name) == (torch.bfloat16, "bf16")
    assert choice.reason == "CPU with AMX-BF16, probe: bf16 700 vs fp32 380 GFLOP/s"
    assert calls == [torch.bfloat16]


def test_auto_stays_fp32_when_the_flag_is_there_but_the_probe_is_slow(cpu_like):
    cpu_like({"avx512_bf16"}, bf16=50e9, fp32=100e9)
    choice = resolve_dtype("auto", CPU)
    assert choice.dtype == torch.float32
    assert choice.reason == "CPU with AVX512-BF16 but bf16 is not faster, probe: bf16 50 vs fp32 100 GFLOP/s"


def test_forced_bf16_on_an_emulating_cpu_warns_with_the_measured_slowdown(cpu_like, capsys):
    cpu_like({"avx2"}, bf16=0.9e9, fp32=85e9)
    choice = resolve_dtype("bf16", CPU)
    assert choice.dtype == torch.bfloat16                  # honoured, not overridden
    assert choice.warning == ("bf16 matmul ran 94.4x slower than fp32 here (0.9 vs 85 GFLOP/s); "
                              "use dtype=auto or fp32")
    resolve_dtype("bf16", CPU)                             # printed once per process
    assert capsys.readouterr().err.splitlines() == [
        "[dtype] bf16 -> bf16 on cpu: bf16 requested",
        "warning: bf16 matmul ran 94.4x slower than fp32 here (0.9 vs 85 GFLOP/s); use dtype=auto or fp32"]
    assert choice.as_dict() == {"dtype": "bf16", "reason": "bf16 requested", "warning": choice.warning}


def test_forced_bf16_on_a_native_cpu_does_not_warn(cpu_like):
    cpu_like({"amx_bf16"}, bf16=700e9, fp32=380e9)
    assert resolve_dtype("bf16", CPU, announce=False).warning is None
    assert resolve_dtype("fp32", CPU, announce=False) == DtypeChoice(torch.float32, "fp32", "fp32 requested")


def test_unknown_dtype_names_the_field():
    with pytest.raises(ConfigError, match="dtype: unknown dtype 'bf17'"):
        resolve_dtype("bf17", CPU)
    assert parse_dtype("bfloat16") is torch.bfloat16


def test_real_probe_measures_both_dtypes():
    low, fp32 = runtime.matmul_speeds(torch.bfloat16, torch.get_num_threads())
    assert low > 0 and fp32 > 0
    assert runtime.matmul_speeds(torch.bfloat16, torch.get_num_threads()) == (low, fp32)   # cached
    assert runtime.measure_matmul_peak(CPU, torch.float32, n=64, repeats=2) > 0


def test_threads_auto_honours_omp_num_threads_then_the_affinity_mask(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads("auto") == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 5}, raising=False)
    assert resolve_threads("auto") == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "")               # set but empty: ignored
    assert resolve_threads("auto") == 2
    assert resolve_threads(4) == 4
    with pytest.raises(ConfigError, match="threads: must be 'auto' or a positive integer, got 0"):
        resolve_threads(0)


def test_low_peak_warning_suggests_one_thread():
    assert low_peak_warning(85e9, 2) is None
    msg = low_peak_warning(2.1e9, 2)
    assert msg == ("the matmul peak measured 2.1 GFLOP/s on 2 thread(s), under 5 GFLOP/s per thread: another "
                   "process is likely busy on these cores; set threads = 1, or check `top` for a busy core")
    assert "threads = 1" not in low_peak_warning(1e9, 1)


def test_a_slow_matmul_is_timed_once_within_the_budget(monkeypatch):
    """An emulated dtype: the warm-up alone overruns the budget, so it is the measurement (no more runs)."""
    clock = iter([0.0, 0.3, 10.0, 10.1])                   # one 0.3 s run, then anything else would show
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: next(clock))
    assert runtime.measure_matmul_peak(CPU, torch.float32, n=8, repeats=5, budget_s=0.1) == pytest.approx(2 * 8**3 / 0.3)


@pytest.mark.parametrize("native", [False, True])
def test_generate_dtype_auto_runs_bf16_weights_in_fp32_only_where_bf16_is_emulated(tmp_path, monkeypatch, capsys,
                                                                                   native):
    import argparse

    from lmstack.infer.cli import _setup
    from lmstack.model import build_model, preset, save
    from lmstack.train.trainer import byte_tokenizer

    torch.manual_seed(0)
    save(build_model(preset("tiny", vocab_size=257, d_model=32, n_layer=1, n_head=2)).to(torch.bfloat16), tmp_path)
    byte_tokenizer().save(tmp_path)
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: "AMX-BF16" if native else None)
    monkeypatch.setattr(runtime, "matmul_speeds", lambda dtype, threads=None: (700e9, 380e9))
    args = argparse.Namespace(run_dir=str(tmp_path), config=None, device="cpu", dtype="auto", overrides=[],
                              stop_id=[], stop_token=[])
    model = _setup(args, 8)[1]
    assert next(model.parameters()).dtype == (torch.bfloat16 if native else torch.float32)
    assert ("weights run in fp32 here: CPU without native bf16" in capsys.readouterr().err) == (not native)
