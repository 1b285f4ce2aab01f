"""Energy meters: cumulative joules from RAPL, NVML, or an explicitly labelled estimate.

Every meter answers the same two questions: how many joules since it was created
(:meth:`EnergyMeter.read_joules`) and what exactly it counts (:meth:`EnergyMeter.describe`).
``measured`` is False for estimates, so a guess is never reported as a measurement.
:func:`detect_meter` picks the best source the machine offers and says why it skipped the others.

Example:
    >>> meter = detect_meter(prefer="estimate", watts=10.0)
    >>> meter.measured, meter.source
    (False, 'estimate:cpu-time')
    >>> meter.read_joules() >= 0.0
    True
"""

from __future__ import annotations

import abc
import logging
import os
import re
import threading
import time
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Callable, Sequence

logger = logging.getLogger(__name__)

RAPL_ROOT = "/sys/class/powercap"
# Watts drawn per fully busy core when nothing is measured. A guess: desktop and server parts
# sit near 5-20 W per core at their TDP (e.g. 65 W / 4-8 cores, 250 W / 32 cores).
DEFAULT_CPU_WATTS_PER_CORE = 15.0
CPU_WATTS_ENV = "ADABATCH_CPU_WATTS"
PREFERENCES = ("auto", "nvml", "rapl", "estimate")


class EnergyMeterError(RuntimeError):
    """An energy source is missing, unreadable or misconfigured."""


class EnergyMeter(abc.ABC):
    """Cumulative energy since construction, from one named source.

    ``source`` names where the joules come from (``"rapl"``, ``"nvml"``, ``"estimate:cpu-time"``,
    or several joined by ``+``); ``measured`` is False for estimates; ``reasons`` is filled by
    :func:`detect_meter` with why better sources were skipped.

    Example:
        >>> with CpuTimeEstimateMeter(watts=10.0) as meter:
        ...     meter.read_joules() >= 0.0
        True
    """

    source: str
    measured: bool
    reasons: tuple[str, ...] = ()

    @abc.abstractmethod
    def read_joules(self) -> float:
        """Joules consumed since the meter was created (monotone non-decreasing)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line saying what is counted, e.g. which zones or devices, or how it is estimated."""

    def close(self) -> None:
        """Release devices and stop background threads; the meter is unusable afterwards."""

    def __enter__(self) -> "EnergyMeter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class _RaplZone:
    """One RAPL counter: its files, its wrap range, and the last raw value seen."""

    def __init__(self, directory: Path, name: str, max_range_uj: int, last_uj: int) -> None:
        self.directory = directory
        self.name = name
        self.max_range_uj = max_range_uj
        self.last_uj = last_uj


class RaplMeter(EnergyMeter):
    """CPU package (and DRAM) energy from Linux powercap RAPL counters.

    Layout read (Intel and recent AMD): ``<root>/intel-rapl:N`` is package N with ``name`` =
    ``package-N``; sub-zones ``intel-rapl:N:M`` are named ``core``, ``uncore`` or ``dram``. Each
    zone has ``energy_uj`` (microjoules) and ``max_energy_range_uj``. The package counter already
    includes core and uncore, so only packages and (with ``include_dram``) dram are summed; a
    ``psys`` zone covers the whole platform, packages included, and is skipped too.

    The counter wraps at ``max_energy_range_uj``; per zone the increment between reads is

        delta = raw - last                      if raw >= last
        delta = (max_energy_range_uj - last) + raw   otherwise (one wrap)

    so the meter must be read at least once per wrap period (max range / power, e.g. 262 kJ at
    200 W is about 20 minutes); more than one wrap between reads cannot be detected.

    Example:
        >>> import pathlib, tempfile
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> zone = root / "intel-rapl:0"
        >>> zone.mkdir()
        >>> _ = (zone / "name").write_text("package-0\\n")
        >>> _ = (zone / "max_energy_range_uj").write_text("262143328850\\n")
        >>> _ = (zone / "energy_uj").write_text("1000000\\n")
        >>> meter = RaplMeter(root)
        >>> _ = (zone / "energy_uj").write_text("3500000\\n")
        >>> meter.read_joules()
        2.5
    """

    source = "rapl"
    measured = True

    def __init__(self, root: str | os.PathLike[str] = RAPL_ROOT, include_dram: bool = True) -> None:
        self.root = Path(root)
        self.include_dram = include_dram
        if not self.root.is_dir():
            raise EnergyMeterError(
                f"no RAPL powercap directory at {self.root}: this is not Linux, the CPU exposes no RAPL "
                "(common in VMs and containers without /sys), or the powercap driver is not loaded "
                "(try `sudo modprobe intel_rapl_common`).")
        self.zones: list[_RaplZone] = []
        self.skipped: list[str] = []
        for directory in self._zone_dirs():
            name = self._read(directory / "name").strip()
            counted = name.startswith("package") or (include_dram and name == "dram")
            if not counted:
                self.skipped.append(f"{directory.name}({name})")
                continue
            max_range = int(self._read(directory / "max_energy_range_uj"))
            self.zones.append(_RaplZone(directory, name, max_range, self._read_energy(directory)))
        if not self.zones:
            raise EnergyMeterError(
                f"no RAPL package zones under {self.root} (found: {', '.join(self.skipped) or 'none'}); "
                "expected intel-rapl:N directories named package-N.")
        self._total_uj = 0

    def _zone_dirs(self) -> list[Path]:
        # /sys/class/powercap lists every zone at top level (as symlinks); the device tree nests
        # sub-zones inside their package. Accept both, once each.
        pattern = re.compile(r"^intel-rapl:\d+(:\d+)?$")
        found: dict[str, Path] = {}
        for path in sorted(self.root.glob("intel-rapl:*")) + sorted(self.root.glob("intel-rapl:*/intel-rapl:*")):
            if pattern.match(path.name) and path.is_dir():
                found.setdefault(path.name, path)
        return [found[k] for k in sorted(found, key=lambda n: [int(x) for x in n.split(":")[1:]])]

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_text()
        except PermissionError:
            raise EnergyMeterError(
                f"cannot read {path}: permission denied. Since Linux 5.10 RAPL counters are readable "
                "by root only; run as root or grant read access with "
                "`sudo chmod o+r /sys/class/powercap/intel-rapl:*/energy_uj "
                "/sys/class/powercap/intel-rapl:*:*/energy_uj`.") from None
        except OSError as exc:
            raise EnergyMeterError(f"cannot read {path}: {exc}") from None

    def _read_energy(self, directory: Path) -> int:
        path = directory / "energy_uj"
        text = self._read(path)
        try:
            return int(text)
        except ValueError:
            raise EnergyMeterError(f"{path} holds {text.strip()!r}, not an integer count of microjoules.") from None

    def read_joules(self) -> float:
        for zone in self.zones:
            raw = self._read_energy(zone.directory)
            if raw >= zone.last_uj:
                self._total_uj += raw - zone.last_uj
            else:
                self._total_uj += zone.max_range_uj - zone.last_uj + raw
            zone.last_uj = raw
        return self._total_uj / 1e6

    def describe(self) -> str:
        counted = ", ".join(f"{z.directory.name}({z.name})" for z in self.zones)
        text = f"RAPL at {self.root}: {counted}"
        if self.skipped:
            text += f"; not added (inside a package or platform total): {', '.join(self.skipped)}"
        return text


class NvmlMeter(EnergyMeter):
    """NVIDIA GPU energy through NVML (``pip install adabatch[nvml]``).

    Per device, the total-energy counter ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules,
    Volta and newer) is used when the device supports it. Otherwise a background thread samples
    ``nvmlDeviceGetPowerUsage`` (milliwatts) every ``poll_interval_s`` and integrates with the
    trapezoid rule,

        E += (P_prev + P_now) / 2 * (t_now - t_prev),

    and each :meth:`read_joules` takes one more sample, so the result is current to the call.
    ``poll_interval_s=None`` runs no thread: samples are taken only when the meter is read, which
    suits callers that read it often. ``nvml`` and ``clock`` replace the ``pynvml`` module and
    ``time.monotonic`` (tests inject fakes through them).

    Example:
        >>> try:
        ...     meter = NvmlMeter()
        ... except EnergyMeterError:  # no pynvml, no NVIDIA driver or no GPU on this machine
        ...     meter = None
        >>> meter is None or meter.read_joules() >= 0.0
        True
    """

    source = "nvml"
    measured = True

    def __init__(self, device_indices: Sequence[int] | None = None, poll_interval_s: float | None = 0.1,
                 nvml: Any | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if poll_interval_s is not None and not poll_interval_s > 0:
            raise EnergyMeterError(f"NvmlMeter poll_interval_s={poll_interval_s!r}: use a number > 0, "
                                   "or None to sample only when the meter is read.")
        self.nvml = nvml if nvml is not None else _import_pynvml()
        self.poll_interval_s = poll_interval_s
        self._clock = clock
        try:
            self.nvml.nvmlInit()
        except Exception as exc:  # pynvml raises NVMLError subclasses; their names vary by version
            raise EnergyMeterError(f"NVML could not start ({exc}); is an NVIDIA driver installed?") from None
        self._initialised = True
        try:
            count = int(self.nvml.nvmlDeviceGetCount())
            indices = list(range(count)) if device_indices is None else list(device_indices)
            if not indices:
                raise EnergyMeterError("NVML found no NVIDIA GPU to measure.")
            bad = [i for i in indices if not 0 <= i < count]
            if bad:
                raise EnergyMeterError(f"NvmlMeter device_indices {bad} do not exist; NVML sees GPUs 0..{count - 1}.")
            self.indices = indices
            self._handles = [self.nvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
            self._names = [_device_name(self.nvml, h) for h in self._handles]
            # Per device: start of the millijoule counter, or None when the device needs polling.
            self._counter_start: list[int | None] = [self._total_energy_mj(h) for h in self._handles]
        except BaseException:
            self.nvml.nvmlShutdown()
            self._initialised = False
            raise
        self._lock = threading.Lock()
        self._polled = [h for h, c in zip(self._handles, self._counter_start) if c is None]
        self._polled_j = 0.0
        self._last_t = self._clock()
        self._last_w = [self._power_w(h) for h in self._polled]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self._polled and poll_interval_s is not None:
            self._thread = threading.Thread(target=self._poll_loop, name="adabatch-nvml-poll", daemon=True)
            self._thread.start()

    def _total_energy_mj(self, handle: Any) -> int | None:
        try:
            return int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        except Exception:  # NVML_ERROR_NOT_SUPPORTED before Volta; any failure means poll instead
            return None

    def _power_w(self, handle: Any) -> float:
        return float(self.nvml.nvmlDeviceGetPowerUsage(handle)) / 1000.0

    def _sample(self) -> None:
        with self._lock:
            watts = [self._power_w(h) for h in self._polled]
            now = self._clock()
            dt = now - self._last_t
            self._polled_j += sum((a + b) / 2.0 * dt for a, b in zip(self._last_w, watts))
            self._last_t, self._last_w = now, watts

    def _poll_loop(self) -> None:
        assert self.poll_interval_s is not None
        while not self._stop.wait(self.poll_interval_s):
            try:
                self._sample()
            except Exception as exc:
                # A dead sampler must not take training down; reads will raise the same error.
                logger.warning("NVML power polling stopped: %s", exc)
                return

    def read_joules(self) -> float:
        if not self._initialised:
            raise EnergyMeterError("NvmlMeter was closed; create a new meter to keep measuring.")
        total_mj = 0
        for handle, start in zip(self._handles, self._counter_start):
            if start is not None:
                total_mj += int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(handle)) - start
        if self._polled:
            self._sample()
        return total_mj / 1000.0 + self._polled_j

    def describe(self) -> str:
        parts = []
        for index, name, start in zip(self.indices, self._names, self._counter_start):
            how = "total-energy counter" if start is not None else (
                f"power polled every {self.poll_interval_s} s, trapezoid-integrated"
                if self.poll_interval_s is not None else "power sampled at each read, trapezoid-integrated")
            parts.append(f"GPU {index} ({name}): {how}")
        return "NVML " + "; ".join(parts)

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._initialised:
            self.nvml.nvmlShutdown()
            self._initialised = False


def _import_pynvml() -> ModuleType:
    try:
        import pynvml
    except ImportError:
        raise EnergyMeterError("NVML energy needs the optional package nvidia-ml-py: "
                               "`pip install adabatch[nvml]` (or `pip install nvidia-ml-py`).") from None
    return pynvml


def _device_name(nvml: Any, handle: Any) -> str:
    name = nvml.nvmlDeviceGetName(handle)
    return name.decode() if isinstance(name, bytes) else str(name)


class CpuTimeEstimateMeter(EnergyMeter):
    """An estimate, not a measurement: this process's CPU time times watts per busy core.

        E = (process CPU seconds since creation) * watts

    CPU seconds sum over threads, so they count busy core-seconds. ``watts`` defaults to the
    ``ADABATCH_CPU_WATTS`` environment variable, else 15 W per busy core, a guess (see
    ``DEFAULT_CPU_WATTS_PER_CORE``). Idle power, other processes (DataLoader workers included) and
    any GPU are not counted. Use it to compare batch sizes on one machine, never as joules to report.

    Example:
        >>> meter = CpuTimeEstimateMeter(watts=10.0)
        >>> meter.measured, meter.source
        (False, 'estimate:cpu-time')
        >>> meter.describe()
        'estimate from process CPU time x 10 W per busy core (given) - not a measurement'
    """

    source = "estimate:cpu-time"
    measured = False

    def __init__(self, watts: float | None = None) -> None:
        if watts is None:
            env = os.environ.get(CPU_WATTS_ENV)
            if env is None:
                watts, self._origin = DEFAULT_CPU_WATTS_PER_CORE, f"guess; set {CPU_WATTS_ENV} to override"
            else:
                try:
                    watts = float(env)
                except ValueError:
                    raise EnergyMeterError(f"{CPU_WATTS_ENV}={env!r} is not a number; set it to the watts "
                                           "one busy core draws, e.g. 15.") from None
                self._origin = f"from {CPU_WATTS_ENV}"
        else:
            self._origin = "given"
        if not (watts > 0 and watts < float("inf")):
            raise EnergyMeterError(f"CpuTimeEstimateMeter watts={watts!r}: use a finite number > 0 "
                                   "(watts per busy core).")
        self.watts = float(watts)
        self._start = time.process_time()

    def read_joules(self) -> float:
        return (time.process_time() - self._start) * self.watts

    def describe(self) -> str:
        return (f"estimate from process CPU time x {self.watts:g} W per busy core ({self._origin}) "
                "- not a measurement")


class SumMeter(EnergyMeter):
    """Several meters read as one (e.g. GPUs plus CPU packages); measured only if all are.

    Example:
        >>> both = SumMeter([CpuTimeEstimateMeter(watts=1.0), CpuTimeEstimateMeter(watts=2.0)])
        >>> both.source, both.measured
        ('estimate:cpu-time+estimate:cpu-time', False)
    """

    def __init__(self, meters: Sequence[EnergyMeter]) -> None:
        if not meters:
            raise EnergyMeterError("SumMeter needs at least one meter.")
        self.meters = list(meters)
        self.source = "+".join(m.source for m in self.meters)
        self.measured = all(m.measured for m in self.meters)

    def read_joules(self) -> float:
        return sum(m.read_joules() for m in self.meters)

    def describe(self) -> str:
        return " + ".join(m.describe() for m in self.meters)

    def close(self) -> None:
        for m in self.meters:
            m.close()


def detect_meter(prefer: str | None = None, watts: float | None = None, *,
                 rapl_root: str | os.PathLike[str] = RAPL_ROOT, nvml: Any | None = None) -> EnergyMeter:
    """The best energy source here: NVML and RAPL summed when available, else the CPU-time estimate.

    ``prefer`` = ``"nvml"``, ``"rapl"`` or ``"estimate"`` asks for one source and raises
    :class:`EnergyMeterError` if it is unavailable; ``None``/``"auto"`` tries NVML and RAPL and
    falls back to :class:`CpuTimeEstimateMeter` (with ``watts``). The returned meter's ``reasons``
    say why each skipped source was skipped; the choice is logged at INFO.

    Example:
        >>> meter = detect_meter()
        >>> meter.measured or meter.source.startswith("estimate:")
        True
        >>> chosen, skipped = meter.describe(), meter.reasons  # what it counts; why others were skipped
    """
    choice = "auto" if prefer is None else prefer
    if choice not in PREFERENCES:
        raise EnergyMeterError(f"detect_meter prefer={prefer!r}: use one of None, {', '.join(PREFERENCES)}.")
    if choice == "nvml":
        return NvmlMeter(nvml=nvml)
    if choice == "rapl":
        return RaplMeter(rapl_root)
    reasons: list[str] = []
    found: list[EnergyMeter] = []
    if choice == "estimate":
        reasons.append("nvml and rapl not tried: prefer='estimate'")
    else:
        for label, build in (("nvml", lambda: NvmlMeter(nvml=nvml)), ("rapl", lambda: RaplMeter(rapl_root))):
            try:
                found.append(build())
            except EnergyMeterError as exc:
                reasons.append(f"{label} skipped: {exc}")
    meter: EnergyMeter
    if found:
        meter = found[0] if len(found) == 1 else SumMeter(found)
    else:
        meter = CpuTimeEstimateMeter(watts)
    meter.reasons = tuple(reasons)
    logger.info("energy meter: %s", meter.describe())
    for reason in reasons:
        logger.info("energy meter: %s", reason)
    return meter
