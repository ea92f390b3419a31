"""Evaluates a checkpoint of a training workdir on the run's validation data.

  python experiments/eval.py --workdir=/tmp/retnet_small            # latest step
  python experiments/eval.py --workdir=/tmp/retnet_small --best     # lowest eval loss

Prints loss, bits per byte (vs the corpus's unigram entropy), perplexity and accuracy.
"""

import json

from absl import app, flags, logging

from retnet_jax import train

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_BEST = flags.DEFINE_bool("best", False, "Use the checkpoint with the lowest eval loss.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    metrics = train.evaluate_checkpoint(_WORKDIR.value, step=_STEP.value, best=_BEST.value)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    app.run(main)
