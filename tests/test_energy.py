"""Energy meters against fakes at the OS and library boundary (no RAPL, NVML or GPU needed)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest

from adabatch.energy import (CpuTimeEstimateMeter, EnergyMeterError, NvmlMeter, RaplMeter, SumMeter,
                             detect_meter)

PKG_RANGE = 262_143_328_850  # max_energy_range_uj of a real Intel package zone
SMALL_RANGE = 1_000_000  # a short range so the test wraps without huge numbers


def make_zone(root: Path, dirname: str, name: str, energy_uj: int, max_range_uj: int = PKG_RANGE) -> Path:
    zone = root / dirname
    zone.mkdir()
    (zone / "name").write_text(name + "\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
    return zone


def set_energy(root: Path, dirname: str, energy_uj: int) -> None:
    (root / dirname / "energy_uj").write_text(f"{energy_uj}\n")


@pytest.fixture
def rapl_tree(tmp_path: Path) -> Path:
    """The /sys/class/powercap layout: control dir, two packages, core and dram sub-zones, psys."""
    (tmp_path / "intel-rapl").mkdir()  # the control type directory; holds no counter
    make_zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    make_zone(tmp_path, "intel-rapl:0:0", "core", 500_000)
    make_zone(tmp_path, "intel-rapl:0:1", "dram", 200_000)
    make_zone(tmp_path, "intel-rapl:1", "package-1", 999_000, max_range_uj=SMALL_RANGE)
    make_zone(tmp_path, "intel-rapl:2", "psys", 40_000_000)
    return tmp_path


def test_rapl_sums_packages_and_dram_to_the_microjoule_across_a_wrap(rapl_tree: Path) -> None:
    meter = RaplMeter(rapl_tree)
    assert meter.measured and meter.source == "rapl"
    assert meter.read_joules() == 0.0

    set_energy(rapl_tree, "intel-rapl:0", 3_500_123)  # +2_500_123
    set_energy(rapl_tree, "intel-rapl:0:0", 900_000)  # core: inside package-0, not added
    set_energy(rapl_tree, "intel-rapl:0:1", 200_456)  # dram: +456
    set_energy(rapl_tree, "intel-rapl:1", 500)  # wrapped: (1_000_000 - 999_000) + 500 = +1_500
    set_energy(rapl_tree, "intel-rapl:2", 90_000_000)  # psys: platform total, not added
    assert meter.read_joules() == pytest.approx(2.502079, abs=1e-9)

    set_energy(rapl_tree, "intel-rapl:1", 2_500)  # +2_000 after the wrap, from the new last value
    assert meter.read_joules() == pytest.approx(2.504079, abs=1e-9)

    text = meter.describe()
    assert "intel-rapl:0(package-0)" in text and "intel-rapl:0:1(dram)" in text
    assert "intel-rapl:0:0(core)" in text.split("not added")[1]
    assert "intel-rapl:2(psys)" in text.split("not added")[1]


def test_rapl_without_dram_counts_packages_only(rapl_tree: Path) -> None:
    meter = RaplMeter(rapl_tree, include_dram=False)
    set_energy(rapl_tree, "intel-rapl:0", 2_000_000)
    set_energy(rapl_tree, "intel-rapl:0:1", 9_200_000)
    assert meter.read_joules() == pytest.approx(1.0, abs=1e-9)


def test_rapl_reads_subzones_nested_inside_their_package(tmp_path: Path) -> None:
    # /sys/devices/virtual/powercap/intel-rapl nests sub-zones in the package directory.
    package = make_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    make_zone(package, "intel-rapl:0:0", "dram", 0)
    meter = RaplMeter(tmp_path)
    set_energy(tmp_path, "intel-rapl:0", 1_000)
    set_energy(package, "intel-rapl:0:0", 10)
    assert meter.read_joules() == pytest.approx(0.00101, abs=1e-12)


def test_rapl_permission_error_names_the_file_and_the_fix(rapl_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root, so chmod would not block the read; fail it where the kernel would.
    blocked = rapl_tree / "intel-rapl:0" / "energy_uj"
    real_read_text = Path.read_text

    def read_text(self: Path, *args, **kwargs) -> str:
        if self == blocked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(EnergyMeterError) as info:
        RaplMeter(rapl_tree)
    message = str(info.value)
    assert str(blocked) in message
    assert "permission denied" in message
    assert "chmod o+r /sys/class/powercap/intel-rapl:*/energy_uj" in message and "root" in message


def test_rapl_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EnergyMeterError, match="no RAPL powercap directory"):
        RaplMeter(tmp_path / "absent")
    (tmp_path / "intel-rapl").mkdir()
    with pytest.raises(EnergyMeterError, match="no RAPL package zones"):
        RaplMeter(tmp_path)


class FakeNVMLError(Exception):
    pass


class FakeNvml:
    """The slice of pynvml that NvmlMeter uses; energy in mJ, power in mW, as NVML reports them."""

    NVMLError = FakeNVMLError

    def __init__(self, energy_mj: list[int | None], power_w=lambda index: 0.0, init_error: bool = False) -> None:
        self.energy_mj = energy_mj  # None: device without a total-energy counter (pre-Volta)
        self.power_w = power_w
        self.init_error = init_error
        self.power_calls = 0
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.init_error:
            raise FakeNVMLError("Driver Not Loaded")

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.energy_mj)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"Fake A100"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        value = self.energy_mj[handle]
        if value is None:
            raise FakeNVMLError("Not Supported")
        return value

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        self.power_calls += 1
        return int(round(self.power_w(handle) * 1000))


def test_nvml_total_energy_counter_sums_devices_in_joules() -> None:
    fake = FakeNvml([10_000, 20_000])
    meter = NvmlMeter(nvml=fake)
    assert meter.measured and meter.source == "nvml"
    fake.energy_mj[0] = 15_500
    fake.energy_mj[1] = 20_250
    assert meter.read_joules() == pytest.approx(5.75, abs=1e-12)
    assert fake.power_calls == 0  # no polling when the counter exists
    assert meter.describe() == "NVML GPU 0 (Fake A100): total-energy counter; GPU 1 (Fake A100): total-energy counter"
    meter.close()
    assert fake.shutdowns == 1
    with pytest.raises(EnergyMeterError, match="closed"):
        meter.read_joules()


def test_nvml_power_polling_integrates_with_the_trapezoid_rule() -> None:
    now = [0.0]
    # A power ramp P(t) = 100 + 20 t W: the trapezoid rule is exact for it, so the answer is
    # the integral 100 t + 10 t^2 at every read.
    fake = FakeNvml([None], power_w=lambda index: 100.0 + 20.0 * now[0])
    meter = NvmlMeter(nvml=fake, poll_interval_s=None, clock=lambda: now[0])
    now[0] = 0.5
    assert meter.read_joules() == pytest.approx(52.5, rel=1e-12)
    now[0] = 2.0
    assert meter.read_joules() == pytest.approx(240.0, rel=1e-12)
    assert "trapezoid" in meter.describe()


def test_nvml_polling_thread_samples_in_the_background_and_stops_on_close() -> None:
    fake = FakeNvml([None, 7_000], power_w=lambda index: 250.0)
    before = time.monotonic()
    meter = NvmlMeter(nvml=fake, poll_interval_s=0.005)
    inner_start = time.monotonic()
    time.sleep(0.1)
    fake.energy_mj[1] = 9_000  # device 1 has a counter: +2 J
    inner_end = time.monotonic()
    joules = meter.read_joules()
    after = time.monotonic()
    assert fake.power_calls >= 5  # the thread sampled while we slept
    # Constant 250 W on device 0 over the meter's lifetime, plus 2 J from device 1's counter.
    assert 250.0 * (inner_end - inner_start) + 2.0 <= joules <= 250.0 * (after - before) + 2.0
    assert "GPU 0 (Fake A100): power polled every 0.005 s" in meter.describe()
    assert "GPU 1 (Fake A100): total-energy counter" in meter.describe()
    meter.close()
    calls = fake.power_calls
    time.sleep(0.03)
    assert fake.power_calls == calls and fake.shutdowns == 1


def test_nvml_without_pynvml_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with pytest.raises(EnergyMeterError, match=r"pip install adabatch\[nvml\]"):
        NvmlMeter()


def test_nvml_without_driver_or_gpu_is_a_clear_error() -> None:
    with pytest.raises(EnergyMeterError, match="NVIDIA driver"):
        NvmlMeter(nvml=FakeNvml([1], init_error=True))
    no_gpu = FakeNvml([])
    with pytest.raises(EnergyMeterError, match="no NVIDIA GPU"):
        NvmlMeter(nvml=no_gpu)
    assert no_gpu.shutdowns == 1
    with pytest.raises(EnergyMeterError, match=r"device_indices \[3\] do not exist"):
        NvmlMeter(device_indices=[3], nvml=FakeNvml([1, 2]))


def _burn_cpu(seconds: float) -> None:
    end = time.process_time() + seconds
    x = 0
    while time.process_time() < end:
        x += 1


def test_cpu_estimate_is_labelled_as_an_estimate_and_grows_with_cpu_work() -> None:
    meter = CpuTimeEstimateMeter(watts=20.0)
    assert meter.measured is False
    assert meter.source.startswith("estimate:")
    assert "not a measurement" in meter.describe()
    start_j, start_cpu = meter.read_joules(), time.process_time()
    _burn_cpu(0.05)
    grown = meter.read_joules() - start_j
    assert grown == pytest.approx(20.0 * (time.process_time() - start_cpu), abs=20.0 * 0.01)
    assert grown >= 20.0 * 0.05


def test_cpu_estimate_watts_come_from_the_environment_or_a_documented_guess(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ADABATCH_CPU_WATTS", raising=False)
    guess = CpuTimeEstimateMeter()
    assert guess.watts == 15.0 and "guess" in guess.describe()
    monkeypatch.setenv("ADABATCH_CPU_WATTS", "7.5")
    assert CpuTimeEstimateMeter().watts == 7.5
    monkeypatch.setenv("ADABATCH_CPU_WATTS", "lots")
    with pytest.raises(EnergyMeterError, match="ADABATCH_CPU_WATTS='lots' is not a number"):
        CpuTimeEstimateMeter()
    with pytest.raises(EnergyMeterError, match="finite number > 0"):
        CpuTimeEstimateMeter(watts=0.0)


def test_detect_meter_falls_back_to_the_estimate_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with caplog.at_level(logging.INFO, logger="adabatch.energy"):
        meter = detect_meter(rapl_root=tmp_path / "no-powercap", watts=12.0)
    assert meter.source == "estimate:cpu-time" and meter.measured is False and meter.watts == 12.0
    nvml_reason, rapl_reason = meter.reasons
    assert nvml_reason.startswith("nvml skipped") and "nvidia-ml-py" in nvml_reason
    assert rapl_reason.startswith("rapl skipped") and "no-powercap" in rapl_reason
    logged = caplog.text
    assert "not a measurement" in logged and "nvml skipped" in logged and "rapl skipped" in logged


def test_detect_meter_on_this_machine_explains_its_choice() -> None:
    meter = detect_meter()
    try:
        if not meter.measured:  # the case on the CPU-only dev box
            assert meter.source.startswith("estimate:")
            assert [r.split()[0] for r in meter.reasons] == ["nvml", "rapl"]
        assert meter.describe()
    finally:
        meter.close()


def test_detect_meter_sums_nvml_and_rapl_when_both_are_there(rapl_tree: Path) -> None:
    fake = FakeNvml([1_000])
    meter = detect_meter(rapl_root=rapl_tree, nvml=fake)
    assert isinstance(meter, SumMeter)
    assert meter.source == "nvml+rapl" and meter.measured and meter.reasons == ()
    fake.energy_mj[0] = 4_000  # +3 J
    set_energy(rapl_tree, "intel-rapl:0", 2_000_000)  # +1 J
    assert meter.read_joules() == pytest.approx(4.0, abs=1e-9)
    meter.close()
    assert fake.shutdowns == 1


def test_detect_meter_honours_an_explicit_preference(tmp_path: Path) -> None:
    assert detect_meter(prefer="estimate", watts=3.0).watts == 3.0
    with pytest.raises(EnergyMeterError, match="no RAPL powercap directory"):
        detect_meter(prefer="rapl", rapl_root=tmp_path / "absent")
    with pytest.raises(EnergyMeterError, match="prefer='gpu'"):
        detect_meter(prefer="gpu")
