"""Peak memory of a call on the CPU, from the allocation events of torch's profiler."""

from __future__ import annotations

from typing import Callable


def cpu_peak_bytes(call: Callable[[], object]) -> int:
    """Peak of the bytes torch's CPU allocator holds during ``call`` above what it held before."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak
