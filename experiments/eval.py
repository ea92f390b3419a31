"""Evaluates a checkpoint of a training workdir on the run's validation data.

  python experiments/eval.py --workdir=/tmp/retnet_small            # latest step
  python experiments/eval.py --workdir=/tmp/retnet_small --best     # lowest eval loss
  python experiments/eval.py --workdir=/tmp/retnet_small --dtype=bfloat16

Prints loss, bits per byte (vs the corpus's unigram entropy), perplexity and accuracy.
`--dtype` and `--retention_kernel` evaluate the trained parameters computed another way
(`train.inference_config`): in another compute dtype, or with another retention kernel.
"""

import json

from absl import app, flags, logging

from retnet_jax import train
from retnet_jax.layers import RETENTION_KERNELS
from retnet_jax.model import DTYPES

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_BEST = flags.DEFINE_bool("best", False, "Use the checkpoint with the lowest eval loss.")
_DTYPE = flags.DEFINE_enum("dtype", None, list(DTYPES), "Compute dtype (default: the run's).")
_RETENTION_KERNEL = flags.DEFINE_enum("retention_kernel", None, list(RETENTION_KERNELS),
                                      "Retention kernel (default: the run's).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    overrides = {name: flag.value for name, flag in (("dtype", _DTYPE),
                                                      ("retention_kernel", _RETENTION_KERNEL))
                 if flag.value is not None}
    metrics = train.evaluate_checkpoint(_WORKDIR.value, step=_STEP.value, best=_BEST.value,
                                        model_overrides=overrides)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    app.run(main)
