"""Which devices `worker run` drives: one GPU process per device (the ``gpu_devices`` setting).

- ``""`` (the default): one GPU process on ``gpu_device_index``, with ``device`` deciding CUDA or CPU as
  it always has. The one-GPU worker, unchanged.
- ``auto``: every device the CUDA driver shows this process (the driver already honours
  ``CUDA_VISIBLE_DEVICES`` and the device plugin's isolation, so the pod's GPUs are 0..n-1). With
  ``device=cpu``, or ``device=auto`` where CUDA is unusable, one process on the CPU.
- ``0,1,3``: these CUDA device indices, one process each. Needs CUDA: an explicit list that quietly
  fell back to the CPU would hide a broken node.
- ``cpu:N``: N GPU processes on the CPU runtime, ``device=cpu`` only. A test and development aid (the
  routing, failure and metrics paths of several GPUs on a machine without one), not a way to go faster.

``parse`` is pure and runs where the option enters (Settings); ``resolve`` turns the parsed plan into
devices with the visible-device count passed in, so both are tested with plain calls. Only
``visible_cuda_devices`` touches the driver (``cuInit`` and a count: no context is created).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from worker.errors import ConfigError


class Mode(enum.Enum):
    SINGLE = "single"
    AUTO = "auto"
    LIST = "list"
    CPU = "cpu"


@dataclass(frozen=True)
class DevicePlan:
    mode: Mode
    indices: tuple[int, ...] = ()  # Mode.LIST
    count: int = 1  # Mode.CPU


@dataclass(frozen=True)
class GpuDevice:
    """One GPU process's device: ``index`` is its CUDA device index (a CPU "device"'s ordinal)."""

    index: int

    def label(self, several: bool) -> str:
        """The process's name in logs and in ``/metrics``'s ``process`` label: ``gpu`` when it is the only
        one (as before several existed), ``gpu-<index>`` otherwise."""
        return f"gpu-{self.index}" if several else "gpu"


def parse(text: str) -> DevicePlan:
    raw = text.strip().lower()
    if raw == "":
        return DevicePlan(Mode.SINGLE)
    if raw == "auto":
        return DevicePlan(Mode.AUTO)
    if raw.startswith("cpu:"):
        n = raw[4:]
        if not n.isdigit() or int(n) < 1:
            raise ConfigError(f"gpu_devices={text!r}: cpu:N takes a count >= 1, e.g. cpu:2")
        return DevicePlan(Mode.CPU, count=int(n))
    parts = [p.strip() for p in raw.split(",")]
    if not all(p.isdigit() for p in parts):
        raise ConfigError(f"gpu_devices={text!r}: give auto, a list of CUDA device indices (0,1), cpu:N, "
                          "or nothing (one GPU: gpu_device_index)")
    indices = tuple(int(p) for p in parts)
    if len(set(indices)) != len(indices):
        raise ConfigError(f"gpu_devices={text!r}: a device listed twice would get two GPU processes, each "
                          "with its own context and engines on the same card")
    return DevicePlan(Mode.LIST, indices=indices)


def resolve(plan: DevicePlan, device: str, gpu_device_index: int,
            visible: Callable[[], tuple[int, str]]) -> list[GpuDevice]:
    """The devices to start a GPU process for. ``visible()`` is (devices the CUDA driver shows, why none
    when 0); it is called only for ``auto`` and lists."""
    if plan.mode is Mode.SINGLE:
        return [GpuDevice(gpu_device_index)]
    if plan.mode is Mode.CPU:
        if device != "cpu":
            raise ConfigError(f"gpu_devices=cpu:{plan.count} runs the CPU runtime: set device=cpu with it "
                              f"(it is a test and development aid), or list CUDA devices (0,1) or auto")
        return [GpuDevice(i) for i in range(plan.count)]
    if device == "cpu":
        if plan.mode is Mode.AUTO:
            return [GpuDevice(gpu_device_index)]
        raise ConfigError(f"gpu_devices={','.join(map(str, plan.indices))} lists CUDA devices but device=cpu; "
                          f"use cpu:N for several CPU processes")
    count, why = visible()
    if plan.mode is Mode.AUTO:
        if count == 0:
            if device == "cuda":
                raise ConfigError(f"gpu_devices=auto with device=cuda, but CUDA is not usable: {why}")
            return [GpuDevice(gpu_device_index)]  # device=auto: the CPU fallback, as with one GPU
        return [GpuDevice(i) for i in range(count)]
    listed = ",".join(map(str, plan.indices))
    if count == 0:
        raise ConfigError(f"gpu_devices={listed} but CUDA is not usable: {why}")
    missing = [i for i in plan.indices if i >= count]
    if missing:
        raise ConfigError(f"gpu_devices={listed} but the CUDA driver sees {count} device(s) (0..{count - 1}); "
                          f"not there: {','.join(map(str, missing))}")
    return [GpuDevice(i) for i in plan.indices]


def describe(devices: Sequence[GpuDevice]) -> str:
    return ",".join(str(d.index) for d in devices)


def visible_cuda_devices() -> tuple[int, str]:
    """(devices the CUDA driver shows this process, why 0). ``cuInit`` and a count only: no context, so
    the supervisor can ask before it spawns the GPU processes (spawned: nothing is inherited)."""
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        return 0, f"pycuda is not importable ({exc}); install the gpu extra"
    try:
        cuda.init()
        count = int(cuda.Device.count())
    except Exception as exc:  # pycuda raises RuntimeError or cuda.Error subclasses here
        return 0, f"the CUDA driver did not initialise: {exc}"
    return count, "" if count else "the CUDA driver sees no device"
