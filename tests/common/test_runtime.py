"""`precision: auto` on CPU: bf16 only where the CPU has bf16 instructions and they measure faster."""

import pytest

from abstract_tagger.common import runtime


@pytest.fixture
def cpu(monkeypatch):
    def fake(native: bool, speedup: float):
        runtime._cpu_precision.cache_clear()
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
        monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: speedup)
    yield fake
    runtime._cpu_precision.cache_clear()


@pytest.mark.parametrize("native, speedup, expected", [
    (False, 3.0, "fp32"),  # no bf16 instructions: emulated, never chosen (and never measured)
    (True, 2.0, "bf16"),   # e.g. the AMD EPYC with AVX512-BF16
    (True, 0.57, "fp32"),  # e.g. an Intel Xeon whose AMX the hypervisor hides
    (True, 1.1, "fp32"),   # within the margin: fp32, so probe noise cannot flip the choice
])
def test_cpu_precision_follows_the_measurement(cpu, native, speedup, expected):
    cpu(native, speedup)
    assert runtime.fast_precision("cpu") == expected


def test_the_probe_measures_something(monkeypatch):
    assert 0.05 < runtime.cpu_bf16_speedup() < 20
