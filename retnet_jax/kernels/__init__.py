"""Optional fused Pallas kernels for retention, checked against retention.py in tests.

* `chunk_output`                 one kernel for chunkwise retention's output (intra-chunk
                                 weights and the entering-state term), from chunked inputs.
* `chunkwise_retention_pallas`   `retention.chunkwise_retention` with its output from that
                                 kernel; same arguments and results, same backward pass.
* `unsupported_reason`           why given head dims / chunk size cannot use the kernel.

Models select it with `ModelConfig.retention_kernel` ('pallas'; see `layers.run_retention`,
which falls back to the XLA path off GPU or for unsupported sizes).

Written for the Pallas Triton GPU backend; pass `interpret=True` to run anywhere (CPU tests).
"""

from retnet_jax.kernels.chunk_output import (
    chunk_output, chunkwise_retention_pallas, unsupported_reason)

__all__ = ["chunk_output", "chunkwise_retention_pallas", "unsupported_reason"]
