"""Trains a language model from a config preset; the README's main command.

  python experiments/train.py --config=configs/small.py --workdir=/tmp/retnet_small
  python experiments/train.py --config=configs/tiny.py --config.model.num_layers=4 \
      --config.train.num_steps=500 --workdir=/tmp/retnet_tiny

Resumes from the workdir's latest checkpoint (refusing a different model config); SIGTERM
saves a checkpoint and exits. Prints evaluations, samples and a final summary; metrics go to
<workdir>/metrics.jsonl and TensorBoard (<workdir>/tensorboard).

Multi-host (GPU clusters, TPU pods): run the same command on every host with --multihost;
jax.distributed.initialize auto-detects TPU and SLURM, or takes --coordinator_address,
--num_processes and --process_id.
"""

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from retnet_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/small.py", "Run config: a configs/ preset file; override fields with "
    "--config.<section>.<field>=value.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, summary.",
                               required=True)
_CACHE = flags.DEFINE_string("compilation_cache", "~/.cache/retnet_jax/xla",
                             "Directory of compiled programs reused across runs ('' for none).")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize first.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (with --multihost).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes (with --multihost).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process (with --multihost).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    if _MULTIHOST.value:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    train.use_compilation_cache(_CACHE.value)
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
