"""Weight import and export for torchscale's RetNetDecoder (microsoft/torchscale 0.3.0).

Name mapping (torchscale state_dict key -> our parameter path; PyTorch Linear weights are
[out, in] and our kernels [in, out], so every `.weight` of a Linear is transposed):

    embed_tokens.weight                     [V, d]   -> embed.embedding               [V, d]
    layers.{i}.retention_layer_norm.weight  [d]      -> blocks.{i}.mixer_norm.scale   [d]
    layers.{i}.retention.q_proj.weight      [d, d]   -> blocks.{i}.mixer.q_proj.kernel   (T)
    layers.{i}.retention.k_proj.weight      [d, d]   -> blocks.{i}.mixer.k_proj.kernel   (T)
    layers.{i}.retention.v_proj.weight      [dv, d]  -> blocks.{i}.mixer.v_proj.kernel   (T)
    layers.{i}.retention.g_proj.weight      [dv, d]  -> blocks.{i}.mixer.g_proj.kernel   (T)
    layers.{i}.retention.out_proj.weight    [d, dv]  -> blocks.{i}.mixer.out_proj.kernel (T)
    layers.{i}.final_layer_norm.weight      [d]      -> blocks.{i}.ffn_norm.scale     [d]
    layers.{i}.ffn.fc1.weight               [f, d]   -> blocks.{i}.ffn.fc1.kernel     (T)
    layers.{i}.ffn.gate.weight              [f, d]   -> blocks.{i}.ffn.gate.kernel    (T)
    layers.{i}.ffn.fc2.weight               [d, f]   -> blocks.{i}.ffn.fc2.kernel     (T)
    layer_norm.weight                       [d]      -> final_norm.scale              [d]
    output_projection.weight                [V, d]   -> output_proj                   (T)
                                                        (tied: must equal embed_tokens.weight)
    retnet_rel_pos.angle, retnet_rel_pos.decay        (buffers: checked, recomputed by us)

The maths is the same: torchscale's per-head decay 1 - 2^(-5-h), its xPos rotation, keys
scaled by head_dim^-0.5, the per-head RMSNorm without affine, silu(g) gate, and its
1/sqrt(sum of the decay row) row scaling (`ModelConfig.sqrt_row_scaling`). Our parallel,
chunkwise and recurrent modes all equal torchscale's parallel and incremental modes.

Known upstream quirk, documented rather than copied: torchscale's chunkwise mode rescales
per chunk with detached abs-sum statistics that differ from its parallel form (measured on
torchscale 0.3.0 in float64: ~2e-3 relative on logits, while its recurrent mode matches its
parallel mode to 1e-16). Ours agrees across all three modes.

torch is never imported here: state_dict values may be torch tensors or numpy arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from retnet_jax import positions
from retnet_jax.model import ModelConfig, RetNetLM

__all__ = ["config_from_torchscale", "import_torchscale", "export_torchscale"]

_T = np.transpose


def _same(x: np.ndarray) -> np.ndarray:
    return x


# torchscale key suffix within layer i -> (our path within blocks[i], transform on import).
_LAYER_KEYS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "retention_layer_norm.weight": (("mixer_norm", "scale"), _same),
    "retention.q_proj.weight": (("mixer", "q_proj", "kernel"), _T),
    "retention.k_proj.weight": (("mixer", "k_proj", "kernel"), _T),
    "retention.v_proj.weight": (("mixer", "v_proj", "kernel"), _T),
    "retention.g_proj.weight": (("mixer", "g_proj", "kernel"), _T),
    "retention.out_proj.weight": (("mixer", "out_proj", "kernel"), _T),
    "final_layer_norm.weight": (("ffn_norm", "scale"), _same),
    "ffn.fc1.weight": (("ffn", "fc1", "kernel"), _T),
    "ffn.gate.weight": (("ffn", "gate", "kernel"), _T),
    "ffn.fc2.weight": (("ffn", "fc2", "kernel"), _T),
}
_GLOBAL_KEYS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "embed_tokens.weight": (("embed", "embedding"), _same),
    "layer_norm.weight": (("final_norm", "scale"), _same),
    "output_projection.weight": (("output_proj",), _T),
}
_BUFFERS = ("retnet_rel_pos.angle", "retnet_rel_pos.decay")

# RetNetConfig fields whose non-default values change the maths in ways we do not implement.
_UNSUPPORTED = {
    "deepnorm": False, "layernorm_embedding": False, "moe_freq": 0, "multiway": False,
    "no_output_layer": False, "decoder_normalize_before": True,
}


def _get(config: Any, name: str, default=None):
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def config_from_torchscale(ts_config: Any, **overrides) -> ModelConfig:
    """Our ModelConfig for a torchscale RetNetConfig (an object or a mapping of its fields).

    Raises ValueError naming any RetNetConfig field whose value we do not implement (deepnorm,
    layernorm_embedding, MoE, multiway, post-norm, no output layer). `overrides` replace
    ModelConfig fields (e.g. max_seq_len, dtype).
    """
    for field, supported in _UNSUPPORTED.items():
        value = _get(ts_config, field, supported)
        if value != supported:
            raise ValueError(f"RetNetConfig.{field}={value!r} is not supported "
                             f"(only {supported!r})")
    vocab_size = _get(ts_config, "vocab_size", -1)
    if vocab_size is None or vocab_size <= 0:
        raise ValueError(f"RetNetConfig.vocab_size must be positive, got {vocab_size!r}")
    fields = dict(
        vocab_size=int(vocab_size),
        d_model=int(_get(ts_config, "decoder_embed_dim", 768)),
        value_dim=int(_get(ts_config, "decoder_value_embed_dim", 1280)),
        ffn_dim=int(_get(ts_config, "decoder_ffn_embed_dim", 1280)),
        num_heads=int(_get(ts_config, "decoder_retention_heads", 3)),
        num_layers=int(_get(ts_config, "decoder_layers", 12)),
        activation=str(_get(ts_config, "activation_fn", "gelu")),
        scale_embedding=not _get(ts_config, "no_scale_embedding", True),
        tie_embeddings=bool(_get(ts_config, "share_decoder_input_output_embed", False)),
        norm_eps=float(_get(ts_config, "layernorm_eps", 1e-6)),
        chunk_size=int(_get(ts_config, "recurrent_chunk_size", 512)),
        max_seq_len=int(_get(ts_config, "max_target_positions", 1024)),
        decay_schedule="torchscale", sqrt_row_scaling=True, use_swish_gate=True,
        use_head_norm=True, layer_schedule=None,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def _to_numpy(x) -> np.ndarray:
    """A torch tensor (without importing torch) or array-like -> numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _key_map(config: ModelConfig) -> dict[str, tuple[tuple, Callable]]:
    """Every torchscale key of a model with this config -> (our flat path, import transform)."""
    if set(config.mixers) != {"retention"}:
        raise ValueError(f"torchscale's RetNetDecoder has only retention layers; "
                         f"layer_schedule is {config.mixers}")
    keys = {}
    for i in range(config.num_layers):
        for suffix, (path, fn) in _LAYER_KEYS.items():
            keys[f"layers.{i}.{suffix}"] = (("blocks", i, *path), fn)
    for key, (path, fn) in _GLOBAL_KEYS.items():
        if key == "output_projection.weight" and config.tie_embeddings:
            continue
        keys[key] = (path, fn)
    return keys


def _check_buffers(state_dict: Mapping[str, Any], config: ModelConfig) -> None:
    """The rel-pos buffers, when present, must equal what we recompute from the config."""
    head_dim = config.d_model // config.num_heads
    expected = {
        "retnet_rel_pos.angle": positions.rotation_frequencies(head_dim),
        "retnet_rel_pos.decay": np.log(positions.decay_gammas(config.num_heads)),
    }
    for key, value in expected.items():
        if key in state_dict:
            got = _to_numpy(state_dict[key]).astype(np.float64)
            if got.shape != value.shape or not np.allclose(got, value, rtol=1e-5, atol=1e-6):
                raise ValueError(f"state_dict[{key!r}] does not match torchscale's formula for "
                                 f"d_model={config.d_model}, num_heads={config.num_heads}")


def import_torchscale(state_dict: Mapping[str, Any], config: ModelConfig | Any, *,
                      seed: int = 0) -> RetNetLM:
    """Builds a RetNetLM holding the weights of a torchscale RetNetDecoder state_dict.

    Args:
      state_dict: `decoder.state_dict()` (torch tensors or numpy arrays); an `embed_tokens.`
        entry is required (torchscale keeps the embedding outside the decoder's constructor).
      config: our ModelConfig, or a torchscale RetNetConfig (converted by
        `config_from_torchscale`).
      seed: for the (fully overwritten) initial parameters.
    Returns:
      The model, parameters in config.param_dtype.
    Raises:
      ValueError naming missing, unexpected or wrongly shaped keys.
    """
    if not isinstance(config, ModelConfig):
        config = config_from_torchscale(config)
    keys = _key_map(config)
    tied_copy = {"output_projection.weight"} if config.tie_embeddings else set()
    missing = sorted(set(keys) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(keys) - set(_BUFFERS) - tied_copy)
    if missing or unexpected:
        raise ValueError(f"state_dict does not fit the config: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    _check_buffers(state_dict, config)
    if tied_copy & set(state_dict) and not np.array_equal(
            _to_numpy(state_dict["output_projection.weight"]),
            _to_numpy(state_dict["embed_tokens.weight"])):
        raise ValueError("config.tie_embeddings is set but state_dict['output_projection.weight'] "
                         "differs from state_dict['embed_tokens.weight']")

    model = RetNetLM(config, rngs=nnx.Rngs(seed))
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for key, (path, fn) in keys.items():
        value = fn(_to_numpy(state_dict[key]))
        target = params[path]
        if value.shape != target.shape:
            raise ValueError(f"state_dict[{key!r}] has shape {value.shape} after conversion; "
                             f"the model expects {target.shape} at {'.'.join(map(str, path))}")
        target.set_value(jnp.asarray(value, target.get_value().dtype))
    return model


def export_torchscale(model: RetNetLM) -> dict[str, np.ndarray]:
    """The model's weights as a torchscale RetNetDecoder state_dict of float32 numpy arrays
    (buffers included), loadable with `decoder.load_state_dict({k: torch.from_numpy(v)})`."""
    config = model.config
    if not (config.sqrt_row_scaling and config.use_swish_gate and config.use_head_norm
            and config.decay_schedule == "torchscale"):
        raise ValueError("only models with torchscale's retention (decay_schedule='torchscale', "
                         "sqrt_row_scaling, use_swish_gate, use_head_norm) can be exported")
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out = {}
    for key, (path, fn) in _key_map(config).items():
        out[key] = np.ascontiguousarray(fn(np.asarray(params[path].get_value(), np.float32)))
    if config.tie_embeddings:  # torchscale's state_dict lists the shared tensor under both names
        out["output_projection.weight"] = out["embed_tokens.weight"]
    head_dim = config.d_model // config.num_heads
    out["retnet_rel_pos.angle"] = positions.rotation_frequencies(head_dim).astype(np.float32)
    out["retnet_rel_pos.decay"] = np.log(positions.decay_gammas(config.num_heads)).astype(
        np.float32)
    return out
