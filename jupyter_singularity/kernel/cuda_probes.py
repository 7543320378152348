"""What makes moving CUDA state unsafe, asked of torch: storages shared with other processes, the
caching allocator's segments, graph captures in progress. Read by the tensor engine's scan
(:mod:`.offload`) before any storage moves."""

from __future__ import annotations

import bisect
import inspect
import sys
from typing import Any


def multiprocessing_shared() -> set[int]:
    """Storages torch.multiprocessing has sent or received (CUDA IPC, CPU shared memory)."""
    reductions = sys.modules.get("torch.multiprocessing.reductions")
    if reductions is None:
        return set()
    return {ref.cdata for ref in list(reductions.shared_cache.values()) if not ref.expired()}


def allocator_segments(torch: Any) -> list[tuple[int, int]] | None:
    """Address ranges of the native caching allocator's segments; None where it cannot say.

    The snapshot is taken without the allocation history's stack traces where torch can leave
    them out (``include_traces``, torch 2.10 and later): with history recording on, collecting
    them costs far more than the offload itself."""
    if torch.cuda.get_allocator_backend() != "native":
        return None
    snapshot = torch.cuda.memory_snapshot
    try:
        lean = "include_traces" in inspect.signature(snapshot).parameters
    except (TypeError, ValueError):  # a builtin without a signature: the plain call
        lean = False
    segments = snapshot(include_traces=False) if lean else snapshot()
    return sorted(
        (segment["address"], segment["address"] + segment["total_size"]) for segment in segments
    )


def capture_in_progress(torch: Any, streams: list[Any]) -> bool:
    """Whether a CUDA graph is being captured on ``streams`` (the live torch.cuda.Stream objects)
    or on this thread's current stream. A capture is a property of its stream; torch only asks
    about the current one, so each stream is made current here (in this thread) in turn. A query
    the driver refuses (cudaErrorStreamCaptureImplicit: the legacy stream asked while another
    stream captures) counts as a capture."""
    try:
        if torch.cuda.is_current_stream_capturing():
            return True
        for stream in streams:
            with torch.cuda.stream(stream):
                if torch.cuda.is_current_stream_capturing():
                    return True
    except RuntimeError:
        return True
    return False


def inside(segments: list[tuple[int, int]], address: int) -> bool:
    index = bisect.bisect_right(segments, (address, float("inf"))) - 1
    return index >= 0 and segments[index][0] <= address < segments[index][1]
