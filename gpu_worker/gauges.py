"""The worker's observable gauges (:mod:`shared.metrics`): its liveness, and its GPU's utilisation and memory.

Liveness (``crop_ai.worker.heartbeat``): 1 while :class:`~gpu_worker.heartbeat.Heartbeat` is healthy by the
``--healthcheck`` rule, 0 when not; a worker that is gone reports nothing, which the workers-silent alert looks for.

GPU, only when the analysis runs on CUDA (:func:`watch_worker` is given a :class:`CudaProbe`): memory from torch's
allocator (``torch.cuda.memory_allocated`` / ``memory_reserved``: this process's tensors and cache), utilisation
from NVML (``torch.cuda.utilization``, which needs the ``nvidia-ml-py`` package and the driver's ``libnvidia-ml``,
present in a container run with ``--gpus``). Without NVML the utilisation reports nothing (logged once) and memory
is still reported. Without CUDA no GPU source is registered, so those gauges report nothing at all.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from gpu_worker.heartbeat import Heartbeat
from shared import metrics

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class GpuProbe(Protocol):
    def utilization(self) -> float | None: ...
    def memory_allocated(self) -> float | None: ...
    def memory_reserved(self) -> float | None: ...


class CudaProbe:
    """The CUDA device the analysis runs on, read at each metric collection (in the exporter's thread)."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._nvml = True
        self._lock = threading.Lock()

    def utilization(self) -> float | None:
        import torch

        with self._lock:
            if not self._nvml:
                return None
            try:
                return float(torch.cuda.utilization(self._device))
            except Exception as e:  # ModuleNotFoundError (no pynvml), NVMLError (no libnvidia-ml): stop asking
                self._nvml = False
                logger.warning("GPU utilisation unavailable (%s); reporting GPU memory only", e,
                               extra={"action": "gpu_utilization_unavailable"})  # fmt: skip
                return None

    def memory_allocated(self) -> float | None:
        import torch

        return float(torch.cuda.memory_allocated(self._device))

    def memory_reserved(self) -> float | None:
        import torch

        return float(torch.cuda.memory_reserved(self._device))


def watch_worker(
    heartbeat: Heartbeat,
    *,
    worker: str,
    device: str,
    max_age: float,
    busy_limit: float,
    gpu: GpuProbe | None = None,
) -> Callable[[], None]:
    """Register the worker's gauges; returns the function that unregisters them (at the worker's exit)."""
    attributes = {"worker": worker, "device": device}

    def alive() -> float:
        return 1.0 if heartbeat.healthy(max_age=max_age, busy_limit=busy_limit) else 0.0

    stops = [metrics.watch(metrics.WORKER_HEARTBEAT, alive, attributes)]
    if gpu is not None:
        stops += [
            metrics.watch(metrics.GPU_UTILIZATION, gpu.utilization, attributes),
            metrics.watch(metrics.GPU_MEMORY_ALLOCATED, gpu.memory_allocated, attributes),
            metrics.watch(metrics.GPU_MEMORY_RESERVED, gpu.memory_reserved, attributes),
        ]

    def stop() -> None:
        for unwatch in stops:
            unwatch()

    return stop
