"""Parity with torchscale 0.3.0 itself: imported weights give the same logits in every mode.

The retention maths comes from torchscale's own RetNetDecoder (CPU, float32). torchscale
imports timm only for `drop_path` (identity at rate 0); a stub module stands in for timm.
"""

import sys
import types

import numpy as np
import pytest
from flax import nnx

from retnet_jax import convert
from retnet_jax.model import ModelConfig, RetNetLM

torch = pytest.importorskip("torch", reason="torch not installed: torchscale parity skipped")


def _stub_timm():
    """torchscale.component.droppath does `from timm.models.layers import drop_path`."""
    if "timm" in sys.modules:
        return
    layers = types.ModuleType("timm.models.layers")
    layers.drop_path = lambda x, drop_prob=0.0, training=False: x
    timm, models = types.ModuleType("timm"), types.ModuleType("timm.models")
    timm.models, models.layers = models, layers
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers})


_stub_timm()
retnet = pytest.importorskip("torchscale.architecture.retnet",
                             reason="torchscale not installed: parity skipped")
ts_config = pytest.importorskip("torchscale.architecture.config")

pytestmark = pytest.mark.torch

CONFIGS = {
    # name: RetNetConfig fields (heads, value factor, layers, activation, embedding options)
    "gelu-2heads": dict(decoder_embed_dim=32, decoder_value_embed_dim=64,
                        decoder_ffn_embed_dim=64, decoder_retention_heads=2, decoder_layers=2),
    "swish-4heads-vf1": dict(decoder_embed_dim=64, decoder_value_embed_dim=64,
                             decoder_ffn_embed_dim=96, decoder_retention_heads=4,
                             decoder_layers=3, activation_fn="swish", no_scale_embedding=False),
    "1head-vf27/16-tied": dict(decoder_embed_dim=32, decoder_value_embed_dim=54,
                               decoder_ffn_embed_dim=54, decoder_retention_heads=1,
                               decoder_layers=1, share_decoder_input_output_embed=True),
}
VOCAB = 50


def torchscale_decoder(fields, seed, weight_scale=1.0):
    """A torchscale RetNetDecoder in float32 eval mode, weights optionally scaled up."""
    torch.manual_seed(seed)
    args = ts_config.RetNetConfig(vocab_size=VOCAB, **fields)
    embed = torch.nn.Embedding(VOCAB, args.decoder_embed_dim)
    torch.nn.init.normal_(embed.weight, std=args.decoder_embed_dim ** -0.5)
    decoder = retnet.RetNetDecoder(args, embed_tokens=embed).eval()
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if "norm" in name:  # random norm scales too, so the mapping of each one matters
                p.uniform_(0.5, 1.5)
            else:
                p.mul_(weight_scale)
    return args, decoder


def torchscale_parallel(decoder, tokens):
    with torch.no_grad():
        return decoder(torch.from_numpy(tokens))[0].numpy()


def torchscale_incremental(decoder, tokens):
    """One token at a time through torchscale's incremental (recurrent) path."""
    state, outs = {}, []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            outs.append(decoder(torch.from_numpy(tokens[:, :t + 1]), incremental_state=state)[0])
    return torch.cat(outs, dim=1).numpy()


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.abs(x - ref).max() / np.abs(ref).max()


@pytest.fixture(scope="module")
def forward():
    """A jitted full-sequence forward per (config, mode), reused across tests."""
    cache = {}

    def run(model, tokens, mode):
        key = (model.config, mode)
        if key not in cache:
            cache[key] = nnx.jit(lambda m, t: m(t, mode=mode))
        return np.asarray(cache[key](model, tokens))
    return run


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("weight_scale", [1.0, 4.0])
def test_logits_match_torchscale(name, weight_scale, forward):
    args, decoder = torchscale_decoder(CONFIGS[name], seed=len(name), weight_scale=weight_scale)
    model = convert.import_torchscale(decoder.state_dict(), args)
    for time in (1, 13, 40):
        tokens = np.random.default_rng(time).integers(0, VOCAB, (2, time))
        ts_par = torchscale_parallel(decoder, tokens)
        ts_inc = torchscale_incremental(decoder, tokens)
        assert rel_err(ts_inc, ts_par) <= 1e-5  # torchscale's own two modes agree
        for mode, ref in (("parallel", ts_par), ("recurrent", ts_inc), ("chunkwise", ts_par)):
            ours = forward(model, tokens, mode)
            assert rel_err(ours, ref) <= 1e-4, (name, time, mode, rel_err(ours, ref))


def test_chunkwise_with_small_chunks_matches_torchscale(forward):
    args, decoder = torchscale_decoder(CONFIGS["gelu-2heads"], seed=7)
    model = convert.import_torchscale(decoder.state_dict(), args)
    model_small_chunks = convert.import_torchscale(
        decoder.state_dict(), convert.config_from_torchscale(args, chunk_size=8))
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 29))
    ref = torchscale_parallel(decoder, tokens)
    assert rel_err(forward(model_small_chunks, tokens, "chunkwise"), ref) <= 1e-4
    assert model.config.chunk_size == 512 and model_small_chunks.config.chunk_size == 8


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_round_trips_into_torchscale(name):
    args, decoder = torchscale_decoder(CONFIGS[name], seed=3)
    exported = convert.export_torchscale(convert.import_torchscale(decoder.state_dict(), args))
    original = decoder.state_dict()
    assert set(exported) == set(original)
    for key, value in original.items():
        if key in convert._BUFFERS:
            # Recomputed from the config: the float64 formula rounded once to float32, where
            # torchscale computes in float32 (its xPos angles are off by up to 6 ulps).
            np.testing.assert_allclose(exported[key], value.numpy(), rtol=1e-6, err_msg=key)
        else:  # learned parameters come back bit for bit
            np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
    # ...and torchscale accepts it (strict) and computes the same logits, to float32
    # accuracy: those few-ulp angle differences move them by ~1e-6 relative.
    _, other = torchscale_decoder(CONFIGS[name], seed=99)
    other.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()})
    tokens = np.random.default_rng(1).integers(0, VOCAB, (1, 9))
    np.testing.assert_allclose(torchscale_parallel(other, tokens),
                               torchscale_parallel(decoder, tokens), rtol=1e-5, atol=1e-6)


def test_config_mapping():
    args = ts_config.RetNetConfig(vocab_size=VOCAB, **CONFIGS["swish-4heads-vf1"])
    config = convert.config_from_torchscale(args, max_seq_len=4096)
    assert (config.d_model, config.num_heads, config.value_dim, config.ffn_dim,
            config.num_layers) == (64, 4, 64, 96, 3)
    assert config.activation == "swish" and config.scale_embedding
    assert config.max_seq_len == 4096


def test_bad_inputs_name_the_problem():
    args, decoder = torchscale_decoder(CONFIGS["gelu-2heads"], seed=0)
    state = decoder.state_dict()
    with pytest.raises(ValueError, match="RetNetConfig.deepnorm"):
        convert.config_from_torchscale(ts_config.RetNetConfig(vocab_size=VOCAB, deepnorm=True,
                                                              subln=False))
    with pytest.raises(ValueError, match="vocab_size"):
        convert.config_from_torchscale(ts_config.RetNetConfig())
    with pytest.raises(ValueError, match=r"missing keys \['layers.1.ffn.fc1.weight'\]"):
        convert.import_torchscale({k: v for k, v in state.items()
                                   if k != "layers.1.ffn.fc1.weight"}, args)
    with pytest.raises(ValueError, match="unexpected keys"):
        convert.import_torchscale({**state, "layers.5.ffn.fc1.weight": state[
            "layers.1.ffn.fc1.weight"]}, args)
    with pytest.raises(ValueError, match="has shape"):
        convert.import_torchscale({**state, "layers.0.ffn.fc1.weight": state[
            "layers.0.ffn.fc1.weight"][:, :5]}, args)
    hybrid = ModelConfig(vocab_size=VOCAB, d_model=32, num_heads=2, num_layers=2,
                         layer_schedule=("retention", "attention"))
    with pytest.raises(ValueError, match="only retention layers"):
        convert.export_torchscale(RetNetLM(hybrid, rngs=nnx.Rngs(0)))
