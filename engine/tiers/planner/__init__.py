"""The planner: a pure function from (footprint, hardware profile, tier config, workload) to a Plan.

Tiers. "resident": the compute device's memory (VRAM on CUDA, RAM within `resident_budget` on CPU).
"host": pinned RAM beside a GPU; on CPU it does not exist as a separate tier (the CPU computes
straight from RAM, so a host copy *is* resident) and host_budget is ignored. "disk": byte ranges
read from the model file itself (O_DIRECT unless io_backend is posix).

Execution model the prediction assumes (and the scheduler implements): per decode step the units
run in order -- embedding lookup, layers 0..L-1, output head. A unit with streamed bytes is loaded
into one of `ring_size` staging buffers; a load may start as soon as a buffer is free (the unit that
used it `ring_size` loads earlier has finished computing), and loads continue across the step
boundary (weights do not depend on the token). Each link (disk, host->device) serves one load at a
time in order. Resident units cost compute only. The predicted step time comes from simulating this
pipeline to its steady state; it can never beat max(total compute, busy time of the busiest link).

Placement search: for each way of splitting a streamed layer (whole layer / FFN only with attention
resident / attention only), each output head and embedding placement, each KV placement and each
ring size, stream the fewest layers that make the budget fit, spread evenly between resident ones
(so the copy queue works while resident layers compute), then spend what budget is left keeping
whole attention/FFN tensors of streamed layers resident. The candidate with the lowest predicted
workload time wins, with two kinds of tie (see `ranked`): among candidates within 3% of the fastest
that all stream small loads through the ring, the deepest pipeline (most staging bytes ahead);
otherwise, within 0.1%, the one moving fewer bytes per step, then the one using less of the
resident tier.
"""
from .contract import (  # noqa: F401 (the planner's API)
                       AUTO_HOST_FRACTION,
                       AUTO_IO_THREADS,
                       AUTO_RESIDENT_FRACTION,
                       DEFAULT_CONTEXT,
                       DISK,
                       DISK_QUEUE_SATURATION,
                       HOST,
                       LINK_DISK,
                       LINK_H2D,
                       RESIDENT,
                       RING_CHOICES,
                       TIERS,
                       LayerPlacement,
                       Plan,
                       Prediction,
                       Workload,
                       workspace_bytes,
)
from .ranking import evaluate, plan, ranked  # noqa: F401
