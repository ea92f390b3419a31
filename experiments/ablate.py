"""Runs a named ablation grid (configs x seeds); writes <grid>.csv/.md and PNG plots.

  python experiments/ablate.py --grid=decay_mqar --scale=tiny --out=results/tiny/decay_mqar
  python experiments/ablate.py --grid=decay_lm --scale=gpu --seeds=0,1,2 --out=results/gpu/lm
  python experiments/ablate.py --grid=paper --scale=gpu --seeds=0,1,2 --out=results/gpu/lm

Grids: decay_mqar, decay_lm (with length extrapolation), paper (see retnet_jax/ablation.py).
Finished cells are skipped, so an interrupted grid resumes where it stopped; grids that share
an --out folder share their common cells. --tables_only rebuilds the tables and plots from the
runs already in --out (e.g. copied back from a GPU machine) without training.
"""

import sys

from absl import app, flags, logging

from retnet_jax import ablation
from retnet_jax import train as train_lib

_GRID = flags.DEFINE_enum("grid", "decay_mqar", sorted(ablation.GRIDS), "Which grid to run.")
_SCALE = flags.DEFINE_enum("scale", "tiny", sorted(ablation.SCALES), "Model/data/step sizes.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Comma-separated seeds; each cell runs once per seed.")
_VARIANTS = flags.DEFINE_list("variants", None, "Only these model variants (default: all).")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: results/<scale>/<grid>).")
_CACHE = flags.DEFINE_string("compilation_cache", "~/.cache/retnet_jax/xla",
                             "Directory of compiled programs reused across runs ('' for none).")
_TABLES_ONLY = flags.DEFINE_bool("tables_only", False, "Train nothing: write the tables and "
                                 "plots from the runs already finished in --out, naming the "
                                 "runs still missing.")
_SHARD = flags.DEFINE_string("shard", "0/1", "i/n: run only every n-th run starting at i (one "
                             "process per GPU, see ablate_parallel.sh); then rerun without it "
                             "for the complete tables.")


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    train_lib.use_compilation_cache(_CACHE.value)
    out = _OUT.value or f"results/{_SCALE.value}/{_GRID.value}"
    shard = tuple(int(x) for x in _SHARD.value.split("/"))
    try:
        rows = ablation.run_grid(_GRID.value, out, scale=_SCALE.value,
                                 seeds=[int(s) for s in _SEEDS.value], variants=_VARIANTS.value,
                                 shard=shard, train=not _TABLES_ONLY.value)
    except ablation.GridStopped as stopped:   # SIGTERM: exit non-zero, naming what is left
        sys.exit(str(stopped))
    if not rows:
        sys.exit(f"no finished runs of {_GRID.value} in {out}/")
    if shard != (0, 1):
        print(f"shard {_SHARD.value}: {len(rows)} runs in {out}/ (tables come from a run "
              "without --shard)")
        return
    with open(f"{out}/{_GRID.value}.md") as f:
        print(f.read())
    print(f"tables and plots in {out}/")

if __name__ == "__main__":
    app.run(main)
