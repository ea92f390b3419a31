"""Samples text from a checkpoint of a training workdir.

  python experiments/generate.py --workdir=/tmp/retnet_small --prompt='def main(' \
      --max_new_tokens=300 --temperature=0.8 --top_p=0.95 --num_samples=3
"""

from absl import app, flags, logging
import jax

from retnet_jax import train

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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    model, _, step = train.load_model(_WORKDIR.value, step=_STEP.value, best=_BEST.value)
    samples = train.sample_text(
        model, _PROMPT.value, max_new_tokens=_MAX_NEW_TOKENS.value,
        temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
        num_samples=_NUM_SAMPLES.value, rng=jax.random.PRNGKey(_SEED.value))
    for i, text in enumerate(samples):
        print(f"--- sample {i} (step {step}) ---\n{text}")


if __name__ == "__main__":
    app.run(main)
