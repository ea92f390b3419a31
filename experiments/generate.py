"""Samples text from a checkpoint of a training workdir.

  python experiments/generate.py --workdir=/tmp/retnet_small --prompt='def main(' \
      --max_new_tokens=300 --temperature=0.8 --top_p=0.95 --num_samples=3

`--state_dtype`, `--decode_kernel` (and `--retention_kernel`, which the prompt's prefill
uses too) load the model with another decoding state dtype or retention kernel than it
trained with (`train.INFERENCE_MODEL_FIELDS`): a bfloat16 state halves the state's memory
and traffic (BENCHMARKS.md "Decoding"; its numerics: `state_precision.py`), 'pallas' runs
each decoded token's state update in one kernel on GPUs.
"""

from absl import app, flags, logging
import jax

from retnet_jax import train
from retnet_jax.layers import DECODE_PROJECTIONS, RETENTION_KERNELS
from retnet_jax.model import DTYPES

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_BEST = flags.DEFINE_bool("best", False, "Use the checkpoint with the lowest eval loss.")
_PROMPT = flags.DEFINE_string("prompt", "def ", "Text to continue (after BOS).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 200, "Tokens (bytes) to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k likeliest tokens; 0: all.")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling mass (default: off).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Independent samples.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STATE_DTYPE = flags.DEFINE_enum("state_dtype", None, list(DTYPES), "The decoding state's "
                                 "dtype (default: the run's).")
_RETENTION_KERNEL = flags.DEFINE_enum("retention_kernel", None, list(RETENTION_KERNELS),
                                      "Retention kernel of the prompt's prefill, and of the "
                                      "decoded tokens where the run sets no decode_kernel "
                                      "(default: the run's).")
_DECODE_KERNEL = flags.DEFINE_enum("decode_kernel", None, list(RETENTION_KERNELS),
                                   "Retention kernel of each decoded token's step (default: "
                                   "the run's decode_kernel, else its retention_kernel).")
_DECODE_PROJECTIONS = flags.DEFINE_enum(
    "decode_projections", None, list(DECODE_PROJECTIONS), "Batch-1 decoding's projections: "
    "'pallas' reads each block's weights through the GEMV kernel (default: the run's).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    overrides = {name: flag.value for name, flag in (("state_dtype", _STATE_DTYPE),
                                                      ("retention_kernel", _RETENTION_KERNEL),
                                                      ("decode_kernel", _DECODE_KERNEL),
                                                      ("decode_projections", _DECODE_PROJECTIONS))
                 if flag.value is not None}
    model, _, step = train.load_model(_WORKDIR.value, step=_STEP.value, best=_BEST.value,
                                      model_overrides=overrides)
    samples = train.sample_text(
        model, _PROMPT.value, max_new_tokens=_MAX_NEW_TOKENS.value,
        temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
        num_samples=_NUM_SAMPLES.value, rng=jax.random.PRNGKey(_SEED.value))
    for i, text in enumerate(samples):
        print(f"--- sample {i} (step {step}) ---\n{text}")


if __name__ == "__main__":
    app.run(main)
