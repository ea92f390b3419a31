"""Optional fused Pallas kernels for retention, checked against retention.py in tests.

Activations stay in their [B, T, H, D] layout (time padded to whole chunks of C tokens when
needed): the kernels index one chunk of the time axis directly, never a transposed copy.

* `chunk_states`                 the chunk recurrence of the states (forward) and of their
                                 gradients (reverse): one program per (batch, head, key
                                 block, value block) loops over the chunks, carrying its
                                 block of the state in registers.
* `chunk_output`                 one kernel for chunkwise retention's output (intra-chunk
                                 weights and the entering-state term).
* `chunk_grads`                  one kernel for the per-chunk part of its backward pass (dq,
                                 dk, dv and the cumulative-decay gradient, from the inputs,
                                 states and state gradients).
* `chunkwise_retention_pallas`   `retention.chunkwise_retention` from these kernels; same
                                 arguments and results.
* `unsupported_reason`           why given head dims / chunk size cannot use the kernels
                                 at all (then `run_retention` uses XLA);
  `backward_unsupported_reason`  why `chunk_grads` cannot take them (then the backward pass
                                 uses retention.py's einsums; the forward kernels still run).

Sizes: the output and gradient kernels hold whole key heads, Dk a power of two in
[16, 128] (fla's usual 128; the sizes compiled and checked on an H100); `chunk_grads` holds
whole value heads too, Dv a power of two in [16, 128]; `chunk_output` splits Dv into
power-of-two column blocks. The 125M-6.7B presets (torchscale widths: Dk 256) use XLA.

Models select them with `ModelConfig.retention_kernel` ('pallas'; see `layers.run_retention`,
which falls back to the XLA path off GPU or for unsupported sizes, and on a multi-device
mesh runs them per device shard under `jax.shard_map`).

Written for the Pallas Triton GPU backend; pass `interpret=True` to run anywhere (CPU tests).
"""

from retnet_jax.kernels.chunk_grads import chunk_grads
from retnet_jax.kernels.chunk_grads import unsupported_reason as backward_unsupported_reason
from retnet_jax.kernels.chunk_output import (
    chunk_output, chunkwise_retention_pallas, unsupported_reason)
from retnet_jax.kernels.chunk_states import chunk_states

__all__ = ["backward_unsupported_reason", "chunk_grads", "chunk_output", "chunk_states",
           "chunkwise_retention_pallas", "unsupported_reason"]
