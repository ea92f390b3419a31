"""Base run config: every section with its defaults. Each preset in this folder starts from
`get_base_config()` and changes what it needs; any field can be overridden on the command line:

    python experiments/train.py --config=configs/small.py --config.model.num_layers=6 \
        --config.model.layer_schedule="('retention',) * 6"

Sections:
  model: every field of `retnet_jax.model.ModelConfig` at its default;
    `ModelConfig.from_config(config.model)` builds and validates it. Fields whose default is
    None ("derived", see ModelConfig) are typed placeholders, so overrides keep their type.

  train, mesh, checkpoint, data: `retnet_jax.train.default_sections()` (optimisation and
    logging, device mesh, Orbax checkpoints, the data of `retnet_jax.data.make_datasets`).

Presets load this file (and small.py) by path with runpy: ml_collections loads config files
by path, and an entry point's sys.path need not contain the repository root.
"""

import ml_collections
from ml_collections import config_dict

from retnet_jax import train


def model_defaults() -> ml_collections.ConfigDict:
    """ModelConfig's fields and defaults (tests/test_configs.py checks they stay in sync)."""
    return ml_collections.ConfigDict(dict(
        # Sizes.
        vocab_size=259,                              # byte tokenizer: 256 bytes + BOS, EOS, PAD
        d_model=256,
        num_layers=4,
        num_heads=4,                                 # retention heads
        value_dim=config_dict.placeholder(int),      # None: 2 * d_model
        ffn_dim=config_dict.placeholder(int),        # None: 2 * d_model
        num_attention_heads=config_dict.placeholder(int),   # None: d_model // 64
        layer_schedule=config_dict.placeholder(tuple),      # None: all 'retention'
        max_seq_len=2048,
        # Block.
        activation="swish",
        scale_embedding=True,
        tie_embeddings=False,
        norm_eps=1e-6,
        logit_soft_cap=0.0,                          # > 0: cap * tanh(logits / cap)
        # Retention.
        decay_schedule="torchscale",
        decay_gamma=1 - 2.0**-5,
        sqrt_row_scaling=True,
        use_swish_gate=True,
        use_head_norm=True,
        gate_logit_normalizer=16.0,
        gate_bias=config_dict.placeholder(float),    # None: YOCO's bias-free gate
        chunk_size=64,
        retention_kernel="xla",  # or 'pallas' (fused GPU kernel, falls back to XLA)
        decode_kernel=config_dict.placeholder(str),  # None: retention_kernel's; or its values
        decode_projections="xla",  # or 'pallas' (batch-1 decoding's GEMV kernel, GPU)
        # Attention.
        attention_impl=config_dict.placeholder(str),  # None: cuDNN on GPU for bf16, else XLA
        # Numerics and memory.
        dtype="float32",
        param_dtype="float32",
        state_dtype="float32",
        remat=False,
        remat_policy="full",
        scan_layers=False,
    ))


def get_base_config() -> ml_collections.ConfigDict:
    """model (above) plus the train, mesh, checkpoint and data sections of retnet_jax.train."""
    config = ml_collections.ConfigDict()
    config.model = model_defaults()
    for name, section in train.default_sections().items():
        config[name] = section
    return config


def paper_scale_config(*, d_model: int, num_layers: int, num_heads: int, width: int,
                       remat: bool, remat_policy: str = "full") -> ml_collections.ConfigDict:
    """The model section shared by the retnet_* presets (GPU scale).

    Retention value width and FFN width are both `width`. With a gated FFN (3 matrices), the
    paper's widths of 2 d_model would give 14 d^2 per layer (1.5B / 3.1B / 7.7B for the
    1.3B / 2.7B / 6.7B shapes); torchscale's LM presets use 27/16 d_model instead, ~12 d^2
    per layer as in GPT-3, and so do these. Vocabulary: GPT-2's padded to 50304 (the size
    parameter counts assume; byte ids fit in it), tied input/output embeddings. bf16
    compute, 2048-token context; `remat` per block for the larger ones, keeping what
    `remat_policy` says. Chunk size 128: the fastest chunkwise retention on an H100 at
    every benchmarked shape (BENCHMARKS.md).
    Blocks are unrolled (`scan_layers` False): a scan re-stacks every block's weights (and
    unstacks their gradients) each step; on an H100 the 1.3B train step at T = 8192 took
    377.8 ms scanned against 337.5 unrolled, peaking at 43.7 against 37.4 GiB, for a first
    step (compile) of 50-64 s instead of 23 (BENCHMARKS.md, "Training", session 19).
    """
    config = get_base_config()
    config.model.update(vocab_size=50304, d_model=d_model, num_layers=num_layers,
                        num_heads=num_heads, value_dim=width, ffn_dim=width,
                        tie_embeddings=True, max_seq_len=2048, dtype="bfloat16", remat=remat,
                        remat_policy=remat_policy, chunk_size=128)
    return config
