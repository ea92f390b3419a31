"""Runs the three forms of retention on random data and prints how closely they agree.

  python experiments/three_forms.py --time=1000 --gated
"""

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from retnet_jax import positions, retention

_BATCH = flags.DEFINE_integer("batch", 2, "Batch size.")
_TIME = flags.DEFINE_integer("time", 777, "Sequence length.")
_HEADS = flags.DEFINE_integer("heads", 4, "Number of heads.")
_KEY_DIM = flags.DEFINE_integer("key_dim", 32, "Key/query head dimension.")
_VALUE_DIM = flags.DEFINE_integer("value_dim", 64, "Value head dimension.")
_CHUNK = flags.DEFINE_integer("chunk_size", 64, "Chunk size of the chunkwise form.")
_GATED = flags.DEFINE_bool("gated", False, "Data-dependent (gated) decay instead of fixed.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")


def main(argv):
    del argv
    ks = jax.random.split(jax.random.PRNGKey(_SEED.value), 4)
    b, t, h = _BATCH.value, _TIME.value, _HEADS.value
    q = jax.random.normal(ks[0], (b, t, h, _KEY_DIM.value)) * _KEY_DIM.value ** -0.5
    k = jax.random.normal(ks[1], (b, t, h, _KEY_DIM.value))
    v = jax.random.normal(ks[2], (b, t, h, _VALUE_DIM.value))
    if _GATED.value:
        log_decay = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h)) + 3.0)
    else:
        log_decay = positions.decay_log_gammas(h)

    parallel = jax.jit(retention.parallel_retention)(q, k, v, log_decay)
    recurrent, state_r = jax.jit(retention.recurrent_retention)(q, k, v, log_decay)
    chunkwise, state_c = jax.jit(retention.chunkwise_retention, static_argnames="chunk_size")(
        q, k, v, log_decay, chunk_size=_CHUNK.value)

    def rel(a, ref):
        return float(jnp.abs(a - ref).max() / jnp.abs(ref).max())

    decay = "gated" if _GATED.value else "fixed multi-scale"
    print(f"retention, {decay} decay, [B, T, H, Dk, Dv] = "
          f"[{b}, {t}, {h}, {_KEY_DIM.value}, {_VALUE_DIM.value}], float32, {jax.devices()[0]}")
    print(f"  recurrent vs parallel   max rel err {rel(recurrent, parallel):.2e}")
    print(f"  chunkwise vs parallel   max rel err {rel(chunkwise, parallel):.2e}"
          f"  (chunk {_CHUNK.value})")
    print(f"  final state chunkwise vs recurrent  {rel(state_c, state_r):.2e}")
    print(f"  output rms {float(np.sqrt(np.mean(np.square(parallel)))):.3f}")


if __name__ == "__main__":
    app.run(main)
