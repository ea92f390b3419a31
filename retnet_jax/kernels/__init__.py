"""Optional fused Pallas kernels for retention, checked against retention.py in tests.

Activations stay in their [B, T, H, D] layout (time padded to whole chunks of C tokens when
needed): the kernels index one chunk of the time axis directly, never a transposed copy.

* `chunk_states`                 the chunk recurrence of the states (forward) and of their
                                 gradients (reverse): one program per (batch, head, key
                                 block, value block) loops over the chunks, carrying its
                                 block of the state in registers; long sequences with few
                                 (batch, head) pairs loop in segments joined in XLA
                                 (`state_segments` picks how many), or, through
                                 `chunk_states.chunk_state_segments`, by `chunk_output`
                                 as it reads them (forward-only calls).
* `chunk_output`                 one kernel for chunkwise retention's output (intra-chunk
                                 weights and the entering-state term).
* `chunk_grads`                  the per-chunk part of its backward pass (dq, dk, dv and
                                 the cumulative-decay gradient, from the inputs, states and
                                 state gradients): one kernel, or two over groups of key and
                                 value columns for heads wider than one tile.
* `chunkwise_retention_pallas`   `retention.chunkwise_retention` from these kernels; same
                                 arguments and results.
* `retention_step_pallas`        `retention.retention_step` (one decoding token) in one
                                 kernel that reads and writes the state once (float32 or
                                 bfloat16, `ModelConfig.state_dtype`; as XLA's fused step
                                 does at batch 8-32; faster than it only at batch 32-64,
                                 BENCHMARKS.md), optionally rotating q and k (xPos) first,
                                 as the models' decoding steps do;
                                 `retention_step_from_splits` the same reading q, k and v
                                 from a GEMV's K-split partials (adding them itself).
* `projections.projections_pallas`  decoding's GEMV: x [M <= 8, K] times several weights in
                                 one kernel, optionally behind the blocks' RMSNorm
                                 (`ModelConfig.decode_projections`); `projection_splits`
                                 leaves its K splits' partials (`SplitSums`) to the reader.
* `unsupported_reason`           why given head dims / chunk size cannot use the kernels
                                 (then `run_retention` uses XLA); `step_unsupported_reason`
                                 the same for the decoding step (head dims only).

Sizes: Dk and Dv multiples of 16 (Triton's smallest dot tile). A program works on at most
128 columns of a head at a time (`common.MAX_BLOCK`: the tiles compiled and timed on an
H100 at Dk = Dv = 128, fla's usual size); wider or odd widths are walked in power-of-two
pieces (`common.pieces`: 432 -> 3 x 128 + 32 + 16). Grid axes that split a head
(`chunk_output`'s value columns, `chunk_states`' key and value columns, `chunk_grads`' two
kernels for heads wider than one group) use groups of a multiple of 16 columns dividing it
(`common.column_group`). So the 125M, 350M, 1.3B and 6.7B presets (torchscale widths:
Dk 256, Dv 432) run on the kernels too; the 2.7B (Dv 428) uses XLA. Timed on an H200
(BENCHMARKS.md, sessions 12-13): at Dk = Dv = 128 the forward takes 0.40-0.82x fla's time
and the forward+backward 0.50-0.78x (same process; 0.4-0.5x and about 0.6x the XLA path's,
timed in session 11); at Dk 256 / Dv 432 the forward takes about the XLA path's time
(0.80 against 0.81 ms) but the forward+backward 1.38x (fixed decay, 2.88 against 2.09 ms)
and 1.13x (gated).

Models select them with `ModelConfig.retention_kernel` ('pallas': the chunkwise form and,
unless `decode_kernel` says otherwise, single-token decoding steps; see
`layers.run_retention`, which falls back to the XLA path off GPU or for unsupported sizes,
and on a multi-device mesh runs them per device shard under `jax.shard_map`).

Written for the Pallas Triton GPU backend; pass `interpret=True` to run anywhere (CPU tests).
"""

from retnet_jax.kernels.chunk_grads import chunk_grads
from retnet_jax.kernels.chunk_output import (
    chunk_output, chunkwise_retention_pallas, unsupported_reason)
from retnet_jax.kernels.chunk_states import chunk_states
from retnet_jax.kernels.decode_step import (retention_step_from_splits, retention_step_pallas,
                                            splits_layout_reason, step_unsupported_reason)

__all__ = ["chunk_grads", "chunk_output", "chunk_states", "chunkwise_retention_pallas",
           "retention_step_from_splits", "retention_step_pallas", "splits_layout_reason",
           "step_unsupported_reason", "unsupported_reason"]
