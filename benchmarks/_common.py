"""What every benchmark script shares: the machine record and interleaved timing."""

import os
import platform
import statistics
import time
from collections.abc import Callable, Hashable

import diffrax as dfx
import jax


def machine() -> dict:
    device = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return dict(
        cpu=cpu,
        cores=os.cpu_count(),
        device=f"{device.platform}: {device.device_kind}",
        jax=jax.__version__,
        diffrax=getattr(dfx, "__version__", "?"),
        date=time.strftime("%Y-%m-%d"),
    )


def interleaved_medians(
    fns: dict[Hashable, Callable[[], object]], repeats: int
) -> dict[Hashable, float]:
    """Median wall-clock seconds of each (already compiled) function, after one
    warm-up call each, with the repeats of all functions interleaved so that drifts
    in machine load hit every one alike."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times: dict[Hashable, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}
