"""Model configuration and the decoder-only language model (torchscale's RetNetDecoder).

    tokens [batch, time] -> embedding (* sqrt(d_model)) -> blocks -> RMSNorm -> logits

Block i is pre-norm, `x + mixer(RMSNorm(x))` then `x + GatedFFN(RMSNorm(x))`, with the token
mixer named by `config.mixers[i]`: 'retention' (RetNet), 'gated_retention' (gRet, YOCO) or
'attention' (softmax attention), so pure RetNet, pure gRet, a Transformer baseline and hybrids
are one class.

Two ways to run it, which compute the same function:
* `model(tokens, mode=...)`: the whole sequence from an empty state; mode 'parallel',
  'chunkwise' or 'recurrent' picks the retention form (training uses 'chunkwise').
* The state API for generation: `init_cache`, `prefill` (chunkwise, right-padded batches of
  different lengths) and `decode_step` (recurrent, one token per sequence).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retnet_jax import positions, sharding
from retnet_jax.layers import (
    ACTIVATIONS, DECODE_PROJECTIONS, FORWARD_MODES, LOGICAL_AXIS_NAMES, RETENTION_KERNELS,
    Attention, AttentionCache, GatedFFN, GatedRetention, MultiScaleRetention, RetentionCache,
    RMSNorm, sharded)

Array = jax.Array

__all__ = [
    "LOGICAL_AXIS_NAMES", "FORWARD_MODES", "MIXERS", "DTYPES", "ATTENTION_IMPLEMENTATIONS",
    "ModelConfig", "Block", "Cache", "RetNetLM", "check_tokens", "schedule_period",
    "parameter_matched", "transformer_baseline", "REMAT_POLICIES",
]

MIXERS = ("retention", "gated_retention", "attention")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")


# --------------------------------------------------------------------------- config


def _fail(field: str, message: str):
    raise ValueError(f"ModelConfig.{field}: {message}")


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that defines the network. Fields left None are derived (see the properties).

    Sizes:
      vocab_size: 259 is the byte tokenizer of `data.py` (256 bytes + BOS, EOS, PAD).
      d_model: residual width; num_layers: number of blocks.
      num_heads: retention heads; key head dim = d_model / num_heads (even, for the rotation).
      value_dim: total retention value width (torchscale's decoder_value_embed_dim);
        None -> 2 * d_model (the paper). torchscale's LM presets use 27/16 * d_model.
      ffn_dim: hidden width of the gated FFN; None -> 2 * d_model.
      num_attention_heads: heads of 'attention' layers; None -> max(1, d_model // 64).
      layer_schedule: one mixer name per block from MIXERS; None -> all 'retention'.
      max_seq_len: the longest sequence (absolute position + 1) the model accepts.
    Block:
      activation: FFN activation, 'swish' (torchscale LM presets), 'gelu' (RetNetConfig's
        default) or 'relu'.
      scale_embedding: multiply embeddings by sqrt(d_model) (torchscale LM presets).
      tie_embeddings: output projection = embedding^T.
      norm_eps: eps of every RMSNorm, block norms and per-head norms (torchscale 1e-6, YOCO 1e-5).
      logit_soft_cap: if > 0, logits become cap * tanh(logits / cap) (Gemma 2 style), in the
        model, so training and sampling see the same distribution; 0 is off.
    Retention (the paper's ablations are the switches):
      decay_schedule: 'torchscale' | 'paper' | 'single' | 'none' (`positions.decay_gammas`);
      decay_gamma: the gamma of 'single'.
      sqrt_row_scaling: torchscale's 1/sqrt(sum_m gamma^(n-m)) row scaling (fixed decay only).
      use_swish_gate: silu(x Wg) * o before out_proj; False removes Wg.
      use_head_norm: per-head RMSNorm (torchscale's "group norm") of the retention output.
      gate_logit_normalizer: gRet log decay = logsigmoid(x W_gt + c) / this (16 in YOCO).
      gate_bias: c, None (YOCO's bias-free gate) or the initial value of a learned per-head
        bias: the initial memory of gated retention (see `layers.GatedRetention`).
      chunk_size: chunk length of the chunkwise form.
      retention_kernel: chunkwise and (unless decode_kernel is set) decoding implementation,
        'xla' (default), 'pallas' (the fused `kernels` for the chunk states, the output and
        the per-chunk gradients, and for each decoded token's state update and read-out, on
        GPU, per device shard under `shard_map` on a mesh; XLA elsewhere or for sizes they
        do not take; chunkwise
        forward ~2x and forward+backward 1.5-2.1x faster than 'xla' at head dims of 128,
        forward+backward 1.13-1.38x slower at the presets' 256 / 432; the decoding step
        0.4-10 % faster a token at batches 1-64 on an H100 at the 1.3B preset: BENCHMARKS.md)
        or 'pallas_interpret' (interpreted, any backend; tests). It changes no parameter: a
        model trained with one can decode with another.
      decode_kernel: the decoding step's retention (one token against a cache): None
        (default) follows retention_kernel; one of its values replaces it there only. The
        1.3B presets train with 'xla' and decode with 'pallas' (1.567 against 1.640 ms a
        token at batch 1 with the GEMV projections, 2.133 against 2.203 at batch 8, 6.623
        against 7.341 at 64, on an H100: BENCHMARKS.md "Decoding", session 19).
      decode_projections: how batch-1 decoding steps compute the blocks' projections
        (`layers.project`): 'xla' (default), 'pallas' (`kernels.projections_pallas`, a GEMV
        kernel that reads each block's q|k|v|gate and FFN input weights in one pass, with
        the pre-norm inside; GPU, single device; XLA elsewhere; 1.18x faster at the 1.3B
        preset on an H200, 1.14x on an H100; the 1.3B presets set it) or 'pallas_interpret'.
        Other batches (`layers.PROJECTION_KERNEL_BATCHES`) and full sequences use XLA's
        GEMMs. Changes no parameter.
    Attention:
      attention_impl: None (cuDNN on GPU for bf16, else XLA), 'xla' or 'cudnn'; used by the
        full-sequence forward (cached prefill/decoding always use XLA with an explicit mask).
    Numerics and memory:
      dtype: compute dtype, 'float32' or 'bfloat16' (retention states are computed, and norms
        and logits kept, in float32); param_dtype: parameter dtype; remat: rematerialise
        each block in the full-sequence forward (training memory).
      remat_policy: what a rematerialised block keeps for the backward pass
        (`REMAT_POLICIES`): 'full' keeps only its input and recomputes the rest; 'dots'
        keeps every matmul output, retention's batched products included; 'projections'
        keeps the outputs of matmuls without batch dimensions (q, k, v, gate, output and
        FFN projections) and recomputes retention and the elementwise work. Unused when
        remat is False.
      state_dtype: the dtype retention layers keep their recurrent state in between calls
        (the decoding cache), 'float32' (default) or 'bfloat16': half the decode state's
        memory and traffic, each step still computed in float32 and the new state rounded
        once (torchscale keeps its state in the activation dtype). The rounding errors
        accumulate over a head's memory: at the 1.3B preset's heads, on random tokens, the
        state drifts 1-2 % from float32's in the fastest heads and 10-24 % in the two
        slowest after 2K-8K tokens (`experiments/state_precision.py`, BENCHMARKS.md), so it
        is for short contexts or after checking a model. Training and the full-sequence
        forward do not use it.
      scan_layers: run the full-sequence forward as a `lax.scan` over the blocks (over
        repeats of the schedule's period for hybrids) instead of unrolling them, so XLA
        compiles one block, not num_layers: much faster compiles for deep models. The
        parameter layout is unchanged: the scan reads stacked copies of the block weights,
        made (and their gradients unstacked) on every call, which made the 1.3B train step
        12 % longer on an H100 (377.8 against 337.5 ms, BENCHMARKS.md "Training", session
        19), so the presets leave it off. Generation (prefill, decode_step) stays unrolled.
    """

    vocab_size: int = 259
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    value_dim: int | None = None
    ffn_dim: int | None = None
    num_attention_heads: int | None = None
    layer_schedule: tuple[str, ...] | None = None
    max_seq_len: int = 2048
    activation: str = "swish"
    scale_embedding: bool = True
    tie_embeddings: bool = False
    norm_eps: float = 1e-6
    logit_soft_cap: float = 0.0
    decay_schedule: str = "torchscale"
    decay_gamma: float = 1 - 2.0**-5
    sqrt_row_scaling: bool = True
    use_swish_gate: bool = True
    use_head_norm: bool = True
    gate_logit_normalizer: float = 16.0
    gate_bias: float | None = None
    chunk_size: int = 64
    retention_kernel: str = "xla"
    decode_kernel: str | None = None
    decode_projections: str = "xla"
    attention_impl: str | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    state_dtype: str = "float32"
    remat: bool = False
    remat_policy: str = "full"
    scan_layers: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelConfig:
        """Builds and validates a config from a mapping or an ml_collections ConfigDict
        (e.g. `config.model` of a `configs/` preset). Unknown keys raise ValueError."""
        values = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; known fields: {sorted(known)}")
        if isinstance(values.get("layer_schedule"), list):
            values["layer_schedule"] = tuple(values["layer_schedule"])
        return cls(**values)

    def __post_init__(self):
        for field in ("vocab_size", "d_model", "num_layers", "num_heads", "max_seq_len",
                      "chunk_size"):
            value = getattr(self, field)
            if not _is_int(value) or value <= 0:
                _fail(field, f"must be a positive integer, got {value!r}")
        for field in ("value_dim", "ffn_dim", "num_attention_heads"):
            value = getattr(self, field)
            if value is not None and (not _is_int(value) or value <= 0):
                _fail(field, f"must be a positive integer or None (derived), got {value!r}")

        if self.d_model % self.num_heads:
            _fail("num_heads", f"{self.num_heads} does not divide d_model={self.d_model}")
        if (self.d_model // self.num_heads) % 2:
            _fail("num_heads", f"key head dim d_model/num_heads = {self.d_model // self.num_heads} "
                  "must be even for the xPos rotation")
        if self.resolved_value_dim % self.num_heads:
            _fail("value_dim", f"num_heads={self.num_heads} does not divide value_dim="
                  f"{self.resolved_value_dim}")

        schedule = self.layer_schedule
        if schedule is not None:
            if isinstance(schedule, str) or not isinstance(schedule, (tuple, list)):
                _fail("layer_schedule", f"must be a tuple of mixer names from {MIXERS}, "
                      f"got {schedule!r}")
            unknown = [m for m in schedule if m not in MIXERS]
            if unknown:
                _fail("layer_schedule", f"unknown mixers {unknown}; choose from {MIXERS}")
            if len(schedule) != self.num_layers:
                _fail("layer_schedule", f"has {len(schedule)} entries but num_layers="
                      f"{self.num_layers}")
        if "attention" in self.mixers:
            heads = self.resolved_attention_heads
            if self.d_model % heads or (self.d_model // heads) % 2:
                _fail("num_attention_heads", f"{heads} heads must divide d_model={self.d_model} "
                      "into even head dims (for the rotation)")

        if self.remat_policy not in REMAT_POLICIES:
            _fail("remat_policy", f"must be one of {tuple(REMAT_POLICIES)}, "
                  f"got {self.remat_policy!r}")
        if self.retention_kernel not in RETENTION_KERNELS:
            _fail("retention_kernel", f"must be one of {RETENTION_KERNELS}, "
                  f"got {self.retention_kernel!r}")
        if self.decode_kernel is not None and self.decode_kernel not in RETENTION_KERNELS:
            _fail("decode_kernel", f"must be None (retention_kernel's) or one of "
                  f"{RETENTION_KERNELS}, got {self.decode_kernel!r}")
        if self.decode_projections not in DECODE_PROJECTIONS:
            _fail("decode_projections", f"must be one of {DECODE_PROJECTIONS}, "
                  f"got {self.decode_projections!r}")
        if self.activation not in ACTIVATIONS:
            _fail("activation", f"must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}")
        if self.decay_schedule not in positions.DECAY_SCHEDULES:
            _fail("decay_schedule", f"must be one of {positions.DECAY_SCHEDULES}, "
                  f"got {self.decay_schedule!r}")
        if not 0.0 < self.decay_gamma <= 1.0:
            _fail("decay_gamma", f"must be in (0, 1], got {self.decay_gamma}")
        if not self.norm_eps >= 0.0:
            _fail("norm_eps", f"must be >= 0, got {self.norm_eps}")
        if not self.logit_soft_cap >= 0.0:
            _fail("logit_soft_cap", f"must be >= 0 (0 is off), got {self.logit_soft_cap}")
        if not self.gate_logit_normalizer > 0.0:
            _fail("gate_logit_normalizer", f"must be > 0, got {self.gate_logit_normalizer}")
        if self.gate_bias is not None and not (
                isinstance(self.gate_bias, (int, float)) and math.isfinite(self.gate_bias)):
            _fail("gate_bias", f"must be None or a finite number, got {self.gate_bias}")
        if self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
            _fail("attention_impl", f"must be one of {ATTENTION_IMPLEMENTATIONS}, "
                  f"got {self.attention_impl!r}")
        for field in ("dtype", "param_dtype", "state_dtype"):
            if getattr(self, field) not in DTYPES:
                _fail(field, f"must be one of {tuple(DTYPES)}, got {getattr(self, field)!r}")

    # Derived values.

    @property
    def mixers(self) -> tuple[str, ...]:
        """The mixer of every block (layer_schedule, or all 'retention')."""
        return tuple(self.layer_schedule or ("retention",) * self.num_layers)

    @property
    def resolved_value_dim(self) -> int:
        return self.value_dim or 2 * self.d_model

    @property
    def retention_head_dims(self) -> tuple[int, int]:
        """(key, value) dims of one retention head: d_model and resolved_value_dim over
        num_heads."""
        return self.d_model // self.num_heads, self.resolved_value_dim // self.num_heads

    @property
    def resolved_ffn_dim(self) -> int:
        return self.ffn_dim or 2 * self.d_model

    @property
    def resolved_attention_heads(self) -> int:
        return self.num_attention_heads or max(1, self.d_model // 64)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]


def parameter_matched(config: ModelConfig, layer_schedule: tuple[str, ...], *,
                      num_attention_heads: int | None = None, multiple: int = 8
                      ) -> ModelConfig:
    """`config` with another layer schedule and (nearly) the same parameter count.

    An attention block has 4 d^2 mixer parameters where retention has 2 d^2 + 3 d * value_dim,
    so each retention block turned into attention is paid back by widening the (shared) FFN
    width by (value_dim - 2 d / 3) / num_layers, rounded to `multiple`; turning attention into
    retention narrows it. num_attention_heads: None keeps config's.
    """
    d = config.d_model
    added = (sum(m == "attention" for m in layer_schedule)
             - sum(m == "attention" for m in config.mixers))
    ffn = (config.resolved_ffn_dim
           + added / config.num_layers * (config.resolved_value_dim - 2 * d / 3))
    heads = config.num_attention_heads if num_attention_heads is None else num_attention_heads
    return dataclasses.replace(config, layer_schedule=tuple(layer_schedule),
                               num_attention_heads=heads,
                               ffn_dim=int(round(ffn / multiple) * multiple))


def transformer_baseline(config: ModelConfig, *, head_dim: int = 64, multiple: int = 8
                         ) -> ModelConfig:
    """The softmax-attention counterpart of `config` with (nearly) the same parameter count:
    same width, depth and embeddings, every mixer attention with `head_dim`-wide heads, the
    FFN widened as `parameter_matched` says."""
    return parameter_matched(config, ("attention",) * config.num_layers,
                             num_attention_heads=max(1, config.d_model // head_dim),
                             multiple=multiple)


# --------------------------------------------------------------------------- validation


def check_tokens(tokens, vocab_size: int, *, rank: int) -> Array:
    """Returns tokens as an int array after checking rank, dtype and (when concrete) range.

    Under tracing (jit) the values cannot be checked: ids outside [0, vocab_size) then give
    NaN embeddings (jnp.take's fill mode), hence NaN logits.
    """
    tokens = jnp.asarray(tokens)
    layout = "[batch, time]" if rank == 2 else "[batch]"
    if tokens.ndim != rank:
        raise ValueError(f"tokens must have rank {rank} {layout}, got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    if not isinstance(tokens, jax.core.Tracer) and tokens.size:
        values = np.asarray(tokens)          # numpy: jnp ops would be staged inside a trace
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"tokens must be ids in [0, vocab_size={vocab_size}), got values "
                             f"in [{low}, {high}]")
    return tokens


def _check_mode(mode: str) -> None:
    if mode not in FORWARD_MODES:
        raise ValueError(f"mode must be one of {FORWARD_MODES}, got {mode!r}")


# --------------------------------------------------------------------------- model


def _make_mixer(kind: str, config: ModelConfig, rngs: nnx.Rngs):
    common = dict(dtype=config.compute_dtype, param_dtype=config.weight_dtype, rngs=rngs,
                  decode_projections=config.decode_projections)
    if kind == "attention":
        return Attention(config.d_model, num_heads=config.resolved_attention_heads,
                         implementation=config.attention_impl, **common)
    common.update(num_heads=config.num_heads, value_dim=config.resolved_value_dim,
                  use_swish_gate=config.use_swish_gate, use_head_norm=config.use_head_norm,
                  norm_eps=config.norm_eps, chunk_size=config.chunk_size,
                  kernel=config.retention_kernel, decode_kernel=config.decode_kernel,
                  state_dtype=DTYPES[config.state_dtype])
    if kind == "retention":
        return MultiScaleRetention(config.d_model, decay_schedule=config.decay_schedule,
                                   decay_gamma=config.decay_gamma,
                                   sqrt_row_scaling=config.sqrt_row_scaling, **common)
    return GatedRetention(config.d_model, gate_logit_normalizer=config.gate_logit_normalizer,
                          gate_bias=config.gate_bias, **common)


class Block(nnx.Module):
    """Pre-norm residual block: x + mixer(RMSNorm(x)), then x + GatedFFN(RMSNorm(x))."""

    def __init__(self, config: ModelConfig, mixer: str, *, rngs: nnx.Rngs):
        norm = dict(eps=config.norm_eps, param_dtype=config.weight_dtype)
        self.mixer_norm = RMSNorm(config.d_model, **norm)
        self.mixer = _make_mixer(mixer, config, rngs)
        self.ffn_norm = RMSNorm(config.d_model, **norm)
        self.ffn = GatedFFN(config.d_model, config.resolved_ffn_dim, activation=config.activation,
                            dtype=config.compute_dtype, param_dtype=config.weight_dtype, rngs=rngs,
                            decode_projections=config.decode_projections)

    def __call__(self, x: Array, *, mode: str, cache=None, position: Array | None = None,
                 valid: Array | None = None):
        """x: [batch, time, d_model]; the rest as the mixers (layers.py). Returns (x, cache)."""
        y, cache = self.mixer(x, mode=mode, cache=cache, position=position, valid=valid,
                              input_norm=self.mixer_norm)
        x = x + y
        return x + self.ffn(x, input_norm=self.ffn_norm, decoding=cache is not None), cache


def schedule_period(mixers: tuple[str, ...]) -> int:
    """The smallest p dividing len(mixers) with mixers[i] == mixers[i % p] for every i."""
    n = len(mixers)
    return next(p for p in range(1, n + 1)
                if n % p == 0 and all(m == mixers[i % p] for i, m in enumerate(mixers)))


# `ModelConfig.remat_policy` names -> what jax.checkpoint saves (None: nothing but the input).
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "projections": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_RESIDUAL = ("batch", None, None)   # logical names of the residual stream [B, T, D]


def _block_output(block: Block, x: Array, mode: str) -> Array:
    """Full-sequence application of one block (the unit that `remat` recomputes); the
    output is kept batch-sharded on the mesh in context (`sharding.constrain`)."""
    return sharding.constrain(block(x, mode=mode)[0], _RESIDUAL)


@jax.custom_vjp
def output_projection(x: Array, kernel: Array) -> Array:
    """Logits x @ kernel, float32 [batch, time, vocab], from x [batch, time, d_model] and
    kernel [d_model, vocab] of one dtype, accumulated in float32.

    Its backward rounds the logits' float32 cotangent to x's dtype before the two matmuls
    (dx, dkernel; float32 accumulation), as mixed-precision training does for every other
    matmul: left to autodiff, a bf16 model's LM-head backward multiplied float32 by bf16,
    i.e. two float32 (TF32) GEMMs, 20 ms of the 1.3B's 390 ms step on an H200
    (BENCHMARKS.md, session 14). A float32 model is unchanged.
    """
    if x.dtype != kernel.dtype:
        raise ValueError(f"output_projection needs x and kernel of one dtype, got {x.dtype} "
                         f"and {kernel.dtype}")
    return jnp.einsum("btd,dv->btv", x, kernel, preferred_element_type=jnp.float32)


def _output_projection_fwd(x, kernel):
    return output_projection(x, kernel), (x, kernel)


def _output_projection_bwd(residuals, d_logits):
    x, kernel = residuals
    d_logits = d_logits.astype(x.dtype)
    dx = jnp.einsum("btv,dv->btd", d_logits, kernel, preferred_element_type=jnp.float32)
    d_kernel = jnp.einsum("btd,btv->dv", x, d_logits, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), d_kernel.astype(kernel.dtype)


output_projection.defvjp(_output_projection_fwd, _output_projection_bwd)


@flax.struct.dataclass
class Cache:
    """Generation state of a whole model (a pytree; pass it through jit).

    position: int32 [batch], tokens consumed so far by each sequence = absolute position of
      its next token.
    layers: per block, `RetentionCache` ([batch, heads, key_dim, value_dim] in
      `ModelConfig.state_dtype`, constant size) or `AttentionCache` ([batch, max_len, heads,
      head_dim] keys and values).
    """
    position: Array
    layers: tuple[RetentionCache | AttentionCache, ...]


class RetNetLM(nnx.Module):
    """Decoder-only language model; see the module docstring.

    Usage:
      model = RetNetLM(config, rngs=nnx.Rngs(0))
      logits = model(tokens, mode='chunkwise')            # float32 [batch, time, vocab]

    Init as torchscale's LM: embeddings and output projection N(0, d_model^-0.5); retention
    and attention as their layers document; FFN as torch.nn.Linear's default.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig (see ModelConfig.from_config), "
                            f"got {type(config).__name__}")
        self.config = config
        d, vocab = config.d_model, config.vocab_size
        init = jax.nn.initializers.normal(stddev=d**-0.5)
        self.embed = nnx.Embed(vocab, d, dtype=config.compute_dtype,
                               param_dtype=config.weight_dtype, embedding_init=init,
                               embedding_metadata=sharded(("vocab", "embed")), rngs=rngs)
        self.blocks = nnx.List([Block(config, mixer, rngs=rngs) for mixer in config.mixers])
        self.final_norm = RMSNorm(d, eps=config.norm_eps, param_dtype=config.weight_dtype)
        self.output_proj = None if config.tie_embeddings else nnx.Param(
            init(rngs.params(), (d, vocab), config.weight_dtype), **sharded(("embed", "vocab")))

    # ---------------------------------------------------------------- full sequence

    def __call__(self, tokens: Array, *, mode: str = "chunkwise") -> Array:
        """Logits of every position, starting from an empty state.

        Args:
          tokens: int [batch, time] ids in [0, vocab_size) (checked eagerly when concrete).
          mode: 'parallel' | 'chunkwise' | 'recurrent' (the retention form; same result).
        Returns:
          float32 [batch, time, vocab_size].
        """
        _check_mode(mode)
        tokens = check_tokens(tokens, self.config.vocab_size, rank=2)
        self._check_length(tokens.shape[1])
        apply = _block_output
        if self.config.remat:
            apply = nnx.remat(_block_output, static_argnums=(2,),
                              policy=REMAT_POLICIES[self.config.remat_policy])
        x = self._embed(tokens)
        if self.config.scan_layers:
            x = self._scan_blocks(x, mode, apply)
        else:
            for block in self.blocks:
                x = apply(block, x, mode)
        return self._logits(x)

    def _scan_blocks(self, x: Array, mode: str, apply) -> Array:
        """The blocks as a `lax.scan` over repeats of the schedule's period p: step r applies
        blocks r*p .. r*p + p-1, whose weights are slices of per-position stacks."""
        period = schedule_period(self.config.mixers)
        graphdefs = [nnx.graphdef(self.blocks[j]) for j in range(period)]
        stacks = [jax.tree.map(lambda *xs: jnp.stack(xs),
                               *(nnx.state(block) for block in self.blocks[j::period]))
                  for j in range(period)]

        def repeat(x, states):
            for graphdef, state in zip(graphdefs, states, strict=True):
                x = apply(nnx.merge(graphdef, state), x, mode)
            return x, None

        return jax.lax.scan(repeat, x, stacks)[0]

    # ---------------------------------------------------------------- state API

    def init_cache(self, batch_size: int, max_len: int | None = None) -> Cache:
        """An empty generation state for `batch_size` sequences of up to `max_len` tokens
        (default max_seq_len). Retention layers hold [batch, heads, key_dim, value_dim] in
        `state_dtype` whatever max_len is; attention layers preallocate [batch, max_len,
        heads, head_dim]."""
        max_len = self.config.max_seq_len if max_len is None else max_len
        if not _is_int(max_len) or not 0 < max_len <= self.config.max_seq_len:
            raise ValueError(f"max_len must be in [1, max_seq_len={self.config.max_seq_len}], "
                             f"got {max_len!r}")
        return Cache(position=jnp.zeros((batch_size,), jnp.int32),
                     layers=tuple(block.mixer.init_cache(batch_size, max_len)
                                  for block in self.blocks))

    def prefill(self, tokens: Array, lengths: Array, cache: Cache) -> tuple[Array, Cache]:
        """Absorbs right-padded prompts into the cache (chunkwise form).

        Sequence b consumes tokens[b, :lengths[b]] at absolute positions cache.position[b] + t;
        padded positions (t >= lengths[b]) leave the cache untouched (their keys are masked and
        their decay is 1; attention never writes or attends to them).

        Args:
          tokens: int [batch, time]; lengths: int [batch] in [0, time].
          cache: from `init_cache` (or an earlier prefill/decode_step).
        Returns:
          (float32 [batch, time, vocab_size] logits of every position (rows past lengths[b]
          are meaningless), the cache with position += lengths).
        """
        tokens = check_tokens(tokens, self.config.vocab_size, rank=2)
        batch, time = tokens.shape
        self._check_length(time)
        lengths = jnp.asarray(lengths)
        if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(f"lengths must be integers of shape ({batch},), got "
                             f"{lengths.dtype}{lengths.shape}")
        if not isinstance(lengths, jax.core.Tracer):
            values = np.asarray(lengths)
            if (values < 0).any() or (values > time).any():
                raise ValueError(f"lengths must be in [0, {time}], got {values}")
            if not isinstance(cache.position, jax.core.Tracer):
                self._check_length(int((np.asarray(cache.position) + values).max()))
        valid = jnp.arange(time)[None, :] < lengths[:, None]
        logits, layers = self._run_with_cache(tokens, "chunkwise", cache, valid)
        return logits, Cache(position=cache.position + lengths.astype(jnp.int32), layers=layers)

    def decode_step(self, tokens: Array, cache: Cache) -> tuple[Array, Cache]:
        """One token per sequence at its own absolute position (recurrent form).

        Attention layers hold positions < the cache's max_len; keys written past it are
        dropped (the caller, e.g. `generate`, sizes the cache). Retention has no such limit.

        Args:
          tokens: int [batch], the next token of each sequence.
          cache: the state after the previous tokens.
        Returns:
          (float32 [batch, vocab_size] next-token logits, the cache with position += 1).
        """
        tokens = check_tokens(tokens, self.config.vocab_size, rank=1)
        logits, layers = self._run_with_cache(tokens[:, None], "recurrent", cache, None)
        return logits[:, 0], Cache(position=cache.position + 1, layers=layers)

    # ---------------------------------------------------------------- helpers

    def count_params(self) -> int:
        """Number of parameters (also works on an `nnx.eval_shape` model)."""
        return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(self, nnx.Param)))

    def _check_length(self, length: int) -> None:
        if length > self.config.max_seq_len:
            raise ValueError(f"sequence of {length} tokens exceeds max_seq_len="
                             f"{self.config.max_seq_len}")

    def _embed(self, tokens: Array) -> Array:
        """int [batch, time] -> [batch, time, d_model] in the compute dtype.

        The lookup reads the table with d_model whole (on a mesh: all-gathered over 'fsdp'
        first, as FSDP does for every weight): a lookup into the d_model-split table would
        give d_model-split rows that XLA can only reshard to batch-split ones by replicating.
        Rows are gathered in the parameter dtype and cast after: the lookup's gradient is a
        scatter-add of every token's row gradient, and in bf16 that scatter both rounds sums
        of thousands of terms and, on real text (a few bytes are most tokens), made a whole
        train step 3.2x slower on an H100 (BENCHMARKS.md, training throughput).
        """
        table = sharding.constrain(self.embed.embedding[...], ("vocab", None))
        x = jnp.take(table, tokens, axis=0).astype(self.config.compute_dtype)
        if self.config.scale_embedding:
            x = x * jnp.asarray(math.sqrt(self.config.d_model), x.dtype)
        return sharding.constrain(x, _RESIDUAL)

    def _logits(self, x: Array) -> Array:
        """[batch, time, d_model] -> float32 [batch, time, vocab] (float32 accumulation)."""
        x = self.final_norm(x)
        if self.output_proj is None:
            kernel = self.embed.embedding[...].T
        else:
            kernel = self.output_proj[...]
        logits = output_projection(x, kernel.astype(x.dtype))
        cap = self.config.logit_soft_cap
        return cap * jnp.tanh(logits / cap) if cap > 0 else logits

    def _run_with_cache(self, tokens: Array, mode: str, cache: Cache, valid: Array | None):
        x = self._embed(tokens)
        layers = []
        for block, layer_cache in zip(self.blocks, cache.layers, strict=True):
            x, layer_cache = block(x, mode=mode, cache=layer_cache, position=cache.position,
                                   valid=valid)
            layers.append(layer_cache)
        return self._logits(x), tuple(layers)
