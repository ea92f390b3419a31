"""Optional fused Pallas kernels for retention, checked against retention.py in tests.

* `chunk_output`                 one kernel for chunkwise retention's output (intra-chunk
                                 weights and the entering-state term), from chunked inputs.
* `chunk_grads`                  one kernel for the per-chunk part of its backward pass (dq,
                                 dk, dv and the cumulative-decay gradient, from chunked inputs,
                                 states and state gradients).
* `chunkwise_retention_pallas`   `retention.chunkwise_retention` with its output from
                                 `chunk_output` and its per-chunk gradients from `chunk_grads`;
                                 same arguments and results.
* `unsupported_reason`           why given head dims / chunk size cannot use the kernel.

Models select it with `ModelConfig.retention_kernel` ('pallas'; see `layers.run_retention`,
which falls back to the XLA path off GPU or for unsupported sizes).

Written for the Pallas Triton GPU backend; pass `interpret=True` to run anywhere (CPU tests).
"""

from retnet_jax.kernels.chunk_grads import chunk_grads
from retnet_jax.kernels.chunk_output import (
    chunk_output, chunkwise_retention_pallas, unsupported_reason)

__all__ = ["chunk_grads", "chunk_output", "chunkwise_retention_pallas", "unsupported_reason"]
