"""Named grids of training runs for the decay ablations, with tables and plots.

A grid is a list of `Cell`s (one model variant on one task setting), each trained for every
seed by `train.train_and_evaluate` in its own workdir under the output folder. `run_grid`
skips cells whose `result.json` exists (resumable), then writes `<grid>.csv` (one row per
cell and seed), `<grid>.md` (mean +- std over seeds) and PNG plots. Cells of the same name
are the same run in every grid (the plain RetNet '@lm' cell is in decay_lm and paper), so
grids that share an output folder train it once.

Grids (see `GRIDS`):
  decay_mqar     fixed RetNet vs gated RetNet (YOCO's gate, and with a learned gate bias
                 starting at 3) vs Transformer vs hybrid on multi-query associative recall,
                 as Zoology does it: one model per variant trained on a mixture of sequence
                 lengths and key-value counts, then query accuracy at each test setting
                 separately, longer sequences than trained on included
  decay_lm       the same five on Python source, nothing to download (validation bits per
                 byte, loss curves) and their length extrapolation: trained at L, evaluated at
                 L, 2L, 4L, 8L
  paper          the RetNet paper's ablations as config switches: without swish gate, without
                 per-head norm, single-scale decay, no decay (gamma = 1), smaller head dim
                 (language modelling, evaluated like decay_lm)

Scales (see `SCALES`): 'tiny' (seconds per cell on a CPU; CI and smoke runs) and 'colab'
(minutes per cell) model the standard library's source (the 'stdlib' corpus); 'gpu'
(d_model 512, 6 layers; meant for one H100/H200) trains language models on ~50M tokens, under
one epoch of 60M bytes of the standard library plus the installed packages' source (the 'python'
corpus; the ~12M-byte standard library alone took 4 epochs and overfit), and runs MQAR with
Zoology's two-block d_model-256 models on Zoology's training mixture.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from retnet_jax import checkpoint
from retnet_jax import data as data_lib
from retnet_jax import positions, sharding
from retnet_jax import train as train_lib
from retnet_jax.model import ModelConfig, parameter_matched, transformer_baseline

__all__ = ["Cell", "SCALES", "GRIDS", "VARIANTS", "GridStopped", "make_cells", "cell_config",
           "check_recorded_config",
           "run_grid", "summarise", "write_tables", "plot_results"]

RESULT_FILE = "result.json"


# ----------------------------------------------------------------------------- scales


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes of one grid scale.

    model: ModelConfig fields shared by every variant (d_model, layers, heads, ...);
      `mqar_model` overrides some of them for the recall task.
    train: TrainConfig fields for language modelling; `mqar_train` for the recall task.
    lm: data fields for language modelling (seq_len, batch_size, max_bytes, eval_batches, and
      the corpus `name`, 'stdlib' unless given).
    mqar_data: data fields of the MQAR training mixture (`data.MQARMixture`: settings, weights,
      vocab_size; and batch_size, eval_batches); rows are padded to the longest setting.
    mqar_test: (seq_len, num_kv_pairs) settings at which each trained MQAR model is evaluated,
      each on its own.
    extrapolation_factors: evaluation lengths as multiples of the training length.
    """
    model: dict[str, Any]
    train: dict[str, Any]
    mqar_train: dict[str, Any]
    lm: dict[str, Any]
    mqar_data: dict[str, Any]
    mqar_test: tuple[tuple[int, int], ...]
    extrapolation_factors: tuple[int, ...] = (1, 2, 4, 8)
    mqar_model: dict[str, Any] = dataclasses.field(default_factory=dict)


_QUIET = dict(progress_bar=False, tensorboard=False, sample_prompt="", log_every=10)

SCALES: dict[str, Scale] = {
    "tiny": Scale(
        model=dict(d_model=32, num_layers=2, num_heads=2, value_dim=64, ffn_dim=64,
                   num_attention_heads=2, chunk_size=16),
        train=dict(num_steps=30, warmup_steps=5, learning_rate=3e-3, eval_every=30, **_QUIET),
        mqar_train=dict(num_steps=30, warmup_steps=5, learning_rate=3e-3, eval_every=30,
                        weight_decay=0.0, **_QUIET),
        lm=dict(seq_len=32, batch_size=8, max_bytes=200_000, eval_batches=2),
        mqar_data=dict(settings=((16, 2), (32, 4)), weights=(0.5, 0.5), batch_size=16,
                       vocab_size=64, eval_batches=2),
        mqar_test=((16, 2), (32, 4), (64, 8)),
        extrapolation_factors=(1, 2, 4)),
    "colab": Scale(
        model=dict(d_model=128, num_layers=2, num_heads=2, value_dim=256, ffn_dim=256,
                   num_attention_heads=2, chunk_size=64),
        train=dict(num_steps=400, warmup_steps=40, learning_rate=3e-3, eval_every=100,
                   **_QUIET),
        mqar_train=dict(num_steps=600, warmup_steps=60, learning_rate=3e-3, eval_every=200,
                        weight_decay=0.0, **_QUIET),
        lm=dict(seq_len=128, batch_size=16, max_bytes=4_000_000, eval_batches=16),
        # MQAR: trained on T=64 with 4 pairs alone, which the Transformer solves within the
        # 600 steps (accuracy 0.999) and carries over to T=128 with 8 pairs (0.99) and T=256
        # with 16 (0.92); mixing in rows of T=128 with 8 pairs (weight 0.5 or 0.2) kept it at
        # 1/pairs accuracy (some value of the context, not the bound one) through 600 steps
        # of 64 rows, and through 1,500 of 32 (CPU, vocabulary 256 and 512).
        mqar_data=dict(settings=((64, 4),), batch_size=64, vocab_size=256, eval_batches=8),
        mqar_test=((64, 4), (128, 8), (256, 16))),
    "gpu": Scale(
        model=dict(d_model=512, num_layers=6, num_heads=4, value_dim=1024, ffn_dim=1024,
                   num_attention_heads=8, chunk_size=64, dtype="bfloat16"),
        # 3,000 steps x 16 x 1,024 tokens = 49M training tokens: under one epoch of the
        # 58M training tokens that `lm` loads.
        train=dict(num_steps=3000, warmup_steps=200, learning_rate=1.5e-3, eval_every=500,
                   **_QUIET),
        # MQAR as in Zoology (Arora et al. 2023): two blocks, d_model 256, vocabulary 8,192, tied
        # embeddings, one model per variant trained on Zoology's mixture (half its rows T=64 with 4
        # pairs; single hard settings trained alone stayed at chance here, and at the colab scale
        # harder rows held back even the easy ones), padded to T=256, then tested at each setting,
        # up to T=1,024 (4x the training length). Zoology sweeps the learning rate (1e-3..3e-2) per
        # model; we use one, 3e-3. Tied embeddings as in Zoology: with 4,096 value ids an untied
        # output layer was still at chance (loss ln 4,096) after 200 steps on a CPU (d_model 128, 64
        # rows of T=64 with 4 pairs; accuracy 0.15 at step 600), a tied one at 0.21 (1/pairs).
        # Zoology also puts a short convolution before every sequence mixer, which these models
        # lack. Cost: 8,000 steps x 128 rows = 1.0M sequences (Zoology: 180K x 32 epochs = 5.8M) =
        # 262M padded tokens; measured on an H200 (session 9): 124-139 s per run at 2.2-2.7M
        # tokens/s, paced by the host drawing each batch (~17 ms on one core), which is why
        # `data.BatchIterator` now draws batches ahead on threads (not yet timed on the GPU).
        mqar_model=dict(num_layers=2, d_model=256, num_heads=2, value_dim=512, ffn_dim=512,
                        num_attention_heads=4, tie_embeddings=True),
        mqar_train=dict(num_steps=8000, warmup_steps=400, learning_rate=3e-3,
                        eval_every=1000, weight_decay=0.0, **_QUIET),
        lm=dict(name="python", seq_len=1024, batch_size=16, max_bytes=60_000_000,
                eval_batches=64),
        mqar_data=dict(settings=((64, 4), (128, 8), (256, 16), (256, 32), (256, 64)),
                       weights=(0.5, 0.125, 0.125, 0.125, 0.125), batch_size=128,
                       vocab_size=8192, eval_batches=16),
        mqar_test=((64, 4), (128, 8), (256, 16), (256, 32), (256, 64), (512, 64),
                   (512, 128), (1024, 128))),
}


# ----------------------------------------------------------------------------- variants


def hybrid_schedule(num_layers: int) -> tuple[str, ...]:
    """Gated retention with softmax attention in every 4th block (the last if fewer than 4)."""
    return tuple("attention" if (i % 4 == 3 or (num_layers < 4 and i == num_layers - 1))
                 else "gated_retention" for i in range(num_layers))


def _all(mixer: str) -> Callable[[dict], dict]:
    return lambda model: {"layer_schedule": (mixer,) * model["num_layers"]}


def _matched_transformer(model: dict) -> dict:
    """All attention, FFN widened so the parameter count matches the retention model's."""
    baseline = transformer_baseline(ModelConfig(**model))
    return {"layer_schedule": baseline.layer_schedule, "ffn_dim": baseline.ffn_dim}


def _matched_hybrid(model: dict) -> dict:
    """`hybrid_schedule`, FFN widened so the parameter count matches the retention model's."""
    hybrid = parameter_matched(ModelConfig(**model), hybrid_schedule(model["num_layers"]))
    return {"layer_schedule": hybrid.layer_schedule, "ffn_dim": hybrid.ffn_dim}


def _single_scale(model: dict) -> dict:
    """All heads share the middle gamma of the multi-scale schedule."""
    gammas = positions.decay_gammas(model["num_heads"])
    return {"decay_schedule": "single", "decay_gamma": float(gammas[len(gammas) // 2])}


# name -> function of the scale's model fields giving the variant's ModelConfig overrides.
VARIANTS: dict[str, Callable[[dict], dict]] = {
    "retnet": _all("retention"),
    "gated": _all("gated_retention"),
    # Gated retention with a long initial memory: a learned per-head gate bias starting at 3
    # (initial decay 0.997 per token instead of 0.958); results/README.md says why.
    "gated_bias3": lambda model: {**_all("gated_retention")(model), "gate_bias": 3.0},
    "transformer": lambda model: _matched_transformer(model),
    "hybrid": _matched_hybrid,
    "-swish_gate": lambda model: {"use_swish_gate": False},
    "-head_norm": lambda model: {"use_head_norm": False},
    "single_scale": _single_scale,
    "no_decay": lambda model: {"decay_schedule": "none"},
    "head_dim/2": lambda model: {"num_heads": 2 * model["num_heads"]},
}

DECAY_VARIANTS = ("retnet", "gated", "gated_bias3", "transformer", "hybrid")
PAPER_VARIANTS = ("retnet", "-swish_gate", "-head_norm", "single_scale", "no_decay",
                  "head_dim/2")


# ----------------------------------------------------------------------------- cells


@dataclasses.dataclass(frozen=True)
class Cell:
    """One model variant on one task setting.

    name: unique within the grid, also the workdir name (e.g. 'gated@mqar-mixture').
    variant: a key of VARIANTS.  task: 'lm' or 'mqar'.  setting: label of the task setting.
    data: data-section overrides for this cell.  evaluate_lengths: extra evaluation lengths
    (extrapolation; result 'bpb@<length>'), empty for none.  evaluate_settings: MQAR
    (seq_len, num_kv_pairs) test settings (result 'acc@T<seq_len>-kv<pairs>'), empty for none.
    """
    name: str
    variant: str
    task: str
    setting: str
    data: dict[str, Any]
    evaluate_lengths: tuple[int, ...] = ()
    evaluate_settings: tuple[tuple[int, int], ...] = ()


def _decay_mqar(scale: Scale) -> list[Cell]:
    """One run per variant on the scale's MQAR mixture, tested at each of `mqar_test`."""
    settings = scale.mqar_data["settings"]
    seq_len = max(t for t, _ in settings)
    data = {"name": "mqar_mixture", "seq_len": seq_len, **scale.mqar_data}
    label = " + ".join(f"T{t}-kv{kv}" for t, kv in settings)
    return [Cell(f"{v}@mqar-mixture", v, "mqar", label, data,
                 evaluate_settings=scale.mqar_test) for v in DECAY_VARIANTS]


def _lm_cells(scale: Scale, variants: Sequence[str]) -> list[Cell]:
    """Language modelling at the scale's length L, evaluated at every extrapolation length."""
    length = scale.lm["seq_len"]
    lengths = tuple(f * length for f in scale.extrapolation_factors)
    return [Cell(f"{v}@lm".replace("/", "_"), v, "lm", f"trained at T={length}",
                 {"name": "stdlib", **scale.lm}, evaluate_lengths=lengths) for v in variants]


def _decay_lm(scale: Scale) -> list[Cell]:
    return _lm_cells(scale, DECAY_VARIANTS)


def _paper(scale: Scale) -> list[Cell]:
    return _lm_cells(scale, PAPER_VARIANTS)


GRIDS: dict[str, Callable[[Scale], list[Cell]]] = {
    "decay_mqar": _decay_mqar,
    "decay_lm": _decay_lm,
    "paper": _paper,
}


def make_cells(grid: str, scale: str) -> list[Cell]:
    """The cells of a named grid at a named scale; ValueError naming an unknown one."""
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {sorted(GRIDS)}, got {grid!r}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")
    return GRIDS[grid](SCALES[scale])


def cell_config(cell: Cell, scale: str, seed: int) -> ml_collections.ConfigDict:
    """The full run config (model, data, train, mesh, checkpoint sections) of one cell."""
    sizes = SCALES[scale]
    model = dict(sizes.model, **(sizes.mqar_model if cell.task == "mqar" else {}))
    model.update(VARIANTS[cell.variant](model))
    model["max_seq_len"] = max((cell.data["seq_len"], *cell.evaluate_lengths,
                                *(t for t, _ in cell.evaluate_settings)))
    if cell.task == "mqar":
        model["vocab_size"] = cell.data["vocab_size"]
    model_config = ModelConfig(**model)                     # validates the variant early
    config = ml_collections.ConfigDict(train_lib.default_sections())
    config.model = ml_collections.ConfigDict(dataclasses.asdict(model_config))
    config.data.update({**cell.data, "seed": seed})
    config.train.update({**(sizes.mqar_train if cell.task == "mqar" else sizes.train),
                         "seed": seed})
    config.checkpoint.update(keep=1)
    return config


# ----------------------------------------------------------------------------- running


def _extra_evaluations(cell: Cell) -> dict[str, tuple[dict[str, Any], str]]:
    """The cell's evaluations after training: result key -> (data overrides, metric)."""
    lengths = {f"bpb@{length}": ({"seq_len": length}, "eval_bits_per_byte")
               for length in cell.evaluate_lengths}
    settings = {f"acc@T{t}-kv{kv}": ({"name": "mqar", "seq_len": t, "num_kv_pairs": kv},
                                     "eval_accuracy")
                for t, kv in cell.evaluate_settings}
    return lengths | settings


def _evaluate_trained(config: ml_collections.ConfigDict, workdir: str,
                      evaluations: dict[str, tuple[dict[str, Any], str]]) -> dict[str, float]:
    """Evaluates the trained cell on each data override of `_extra_evaluations` (about as many
    tokens per batch as in training); {result key: the override's metric}."""
    trainer = train_lib.make_trainer(config)
    params, _ = train_lib.restore_params(trainer, workdir)
    shards = math.prod(trainer.mesh.shape[a] for a in sharding.BATCH_AXES)
    tokens_per_batch = config.data.batch_size * config.data.seq_len
    out = {}
    for key, (overrides, metric) in evaluations.items():
        batch_size = max(shards, tokens_per_batch // overrides["seq_len"] // shards * shards)
        data = dict(train_lib.data_config(config), **overrides, batch_size=batch_size)
        datasets = data_lib.make_datasets(data)
        out[key] = train_lib.evaluate(trainer, params, datasets.make_eval())[metric]
    return out


# Train config fields that change what is logged or sampled, not what is trained.
_LOGGING_FIELDS = frozenset({"progress_bar", "tensorboard", "log_every", "eval_every",
                             "sample_prompt", "sample_tokens", "sample_temperature",
                             "sample_top_k"})


def check_recorded_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Raises ValueError unless the run recorded in `workdir` (if any) was trained with
    `config`'s model, data and training settings, so a finished result or a checkpoint is
    only reused for the cell it measured (e.g. not after a scale changes its corpus).
    """
    if not os.path.exists(os.path.join(workdir, checkpoint.CONFIG_FILE)):
        return
    saved = checkpoint.load_config(workdir)
    hint = f"Use another --out, or delete {workdir} to retrain it."
    model = lambda c: dataclasses.asdict(ModelConfig.from_config(c.model))  # defaults filled
    checkpoint.check_resumable(model(saved), model(config), what=f"model config of {workdir}",
                               hint=hint)
    checkpoint.check_resumable(train_lib.data_config(saved), train_lib.data_config(config),
                               train_lib.RESUMABLE_DATA_FIELDS,
                               what=f"data config of {workdir}", hint=hint)
    train = lambda c: dataclasses.asdict(train_lib.from_section(train_lib.TrainConfig, c.train))
    checkpoint.check_resumable(train(saved), train(config), _LOGGING_FIELDS,
                               what=f"train config of {workdir}", hint=hint)


def _run_cell(cell: Cell, scale: str, seed: int, workdir: str) -> dict[str, Any] | None:
    """Trains one cell (resuming from its checkpoints) and returns its result row, or None
    when training stopped early (SIGTERM: its checkpoint is saved, the row is not)."""
    config = cell_config(cell, scale, seed)
    summary = train_lib.train_and_evaluate(config, workdir)
    if not summary["completed"]:
        print(f"{cell.name} seed {seed} stopped at step {summary['step']} (SIGTERM); its "
              "checkpoint is saved: run the same command to resume", flush=True)
        return None
    abstract_params = train_lib.make_trainer(config).abstract_state.params
    row = {"cell": cell.name, "variant": cell.variant, "task": cell.task,
           "setting": cell.setting, "seed": seed,
           "num_params": sum(x.size for x in jax.tree.leaves(abstract_params)),
           "steps": summary["step"], "epochs": summary["epochs"],
           "train_tokens_per_s": summary["tokens_per_s"],
           "eval_loss": summary["eval_loss"], "eval_accuracy": summary["eval_accuracy"],
           "eval_bits_per_byte": summary["eval_bits_per_byte"]}
    evaluations = _extra_evaluations(cell)
    if evaluations:
        row.update(_evaluate_trained(config, workdir, evaluations))
    return row


class GridStopped(RuntimeError):
    """A grid stopped by SIGTERM before all its runs finished; calling again resumes it."""


def run_grid(grid: str, out_dir: str, *, scale: str = "tiny", seeds: Sequence[int] = (0,),
             variants: Sequence[str] | None = None, shard: tuple[int, int] = (0, 1),
             progress: bool = True, train: bool = True) -> list[dict[str, Any]]:
    """Runs (or resumes) every cell x seed of a grid, then writes tables and plots.

    `variants` restricts the grid to those model variants (default: all of the grid's).
    `train=False` trains nothing: the tables and plots come from the runs already finished
    (e.g. copied back from a GPU machine) and name the runs still missing.
    Runs go seed by seed (every cell of the first seed first). `shard=(i, n)` runs only
    runs i, i + n, i + 2n, ... so n processes (one per GPU) can split a grid; shards write
    no tables, a last call with the default shard reads every result back and writes them.
    Layout: `<out_dir>/<cell>/seed<k>/` holds the run's workdir and its `result.json`;
    `<out_dir>/<grid>.csv`, `<grid>.md` and `<grid>*.png` summarise the grid.

    SIGTERM (e.g. a job's time limit) checkpoints the run in progress and stops the grid
    without writing that run's row or the tables; calling again resumes.

    Returns:
      One row per cell and seed (the rows of <grid>.csv).
    Raises:
      GridStopped: after SIGTERM stopped a run (its checkpoint is saved).
    """
    cells = make_cells(grid, scale)
    if variants is not None:
        unknown = sorted(set(variants) - {c.variant for c in cells})
        if unknown:
            raise ValueError(f"variants {unknown} are not in grid {grid!r}; it has "
                             f"{sorted({c.variant for c in cells})}")
        cells = [c for c in cells if c.variant in variants]
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    if not train and shard != (0, 1):
        raise ValueError("train=False (tables only) reads every run back: give no shard")
    rows, missing = [], []
    jobs = [(cell, seed) for seed in seeds for cell in cells][index::count]
    for cell, seed in tqdm(jobs, desc=f"{grid} ({scale})", unit="run", disable=not progress):
        workdir = os.path.join(out_dir, cell.name, f"seed{seed}")
        check_recorded_config(workdir, cell_config(cell, scale, seed))
        result_path = os.path.join(workdir, RESULT_FILE)
        if os.path.exists(result_path):
            with open(result_path) as f:
                rows.append(_with_best_eval(json.load(f), workdir))
            continue
        if not train:
            missing.append(f"{cell.name} seed {seed}")
            continue
        row = _run_cell(cell, scale, seed, workdir)
        if row is None:  # stopped by SIGTERM: so is the grid (no row, no tables)
            raise GridStopped(f"{grid}: stopped during {cell.name} seed {seed}; {len(rows)} "
                              f"of {len(jobs)} runs finished; run the same call to resume")
        with open(result_path + ".tmp", "w") as f:
            json.dump(row, f, indent=2)
        os.replace(result_path + ".tmp", result_path)       # a cell counts only when complete
        rows.append(_with_best_eval(row, workdir))
    if shard != (0, 1) or not rows:   # shards run side by side: the last, whole call writes
        return rows
    write_tables(rows, out_dir, grid=grid, scale=scale, missing=missing)
    plot_results(rows, out_dir, grid=grid)
    return rows


# ----------------------------------------------------------------------------- tables


def _metric_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The metrics present in `rows`: training's, then the extra evaluations' (bpb@<length>,
    acc@T<seq_len>-kv<pairs>) in increasing order of their numbers."""
    names = ["eval_accuracy", "eval_bits_per_byte", "best_eval_bits_per_byte", "eval_loss"]
    names = [n for n in names if any(n in row for row in rows)]
    extra = sorted({k for row in rows for k in row if k.startswith(("bpb@", "acc@"))},
                   key=lambda k: (k[:4], [int(n) for n in re.findall(r"\d+", k)]))
    return names + extra


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds per cell: rows with '<metric>' and
    '<metric>_std' columns, plus 'seeds' (the number of seeds)."""
    by_cell: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_cell.setdefault(row["cell"], []).append(row)
    out = []
    for cell_rows in by_cell.values():
        first = cell_rows[0]
        summary = {k: first[k] for k in ("cell", "variant", "task", "setting", "num_params")}
        summary["seeds"] = len(cell_rows)
        for metric in _metric_columns(cell_rows):
            values = np.array([r[metric] for r in cell_rows if metric in r], np.float64)
            if values.size:
                summary[metric] = float(values.mean())
                summary[metric + "_std"] = float(values.std())
        out.append(summary)
    return out


def write_tables(rows: Sequence[dict[str, Any]], out_dir: str, *, grid: str, scale: str,
                 missing: Sequence[str] = ()) -> None:
    """<grid>.csv (every run) and <grid>.md (mean +- std over each cell's seeds, their
    number in the 'seeds' column; `missing` names runs not finished yet) in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(os.path.join(out_dir, f"{grid}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    metrics = _metric_columns(rows)
    metrics.remove("eval_bits_per_byte" if grid == "decay_mqar" else "eval_accuracy")
    seeds = sorted({row["seed"] for row in rows})
    seeds_note = "mean ± std over seeds" if len(seeds) > 1 else "one seed: no spread"
    lines = [f"# {grid} ({scale} scale, seeds {seeds}; {seeds_note})", "",
             "| variant | setting | params | seeds | " + " | ".join(metrics) + " |",
             "|---|---|---:|---:|" + "---:|" * len(metrics)]
    for s in summarise(rows):
        cells = [("" if m not in s else f"{s[m]:.4f}" if s["seeds"] == 1
                  else f"{s[m]:.4f} ± {s[m + '_std']:.4f}") for m in metrics]
        lines.append(f"| {s['variant']} | {s['setting']} | {s['num_params']:,} | "
                     f"{s['seeds']} | " + " | ".join(cells) + " |")
    if missing:
        lines += ["", f"Not finished yet ({len(missing)} of {len(rows) + len(missing)} runs): "
                  + ", ".join(missing) + "."]
    with open(os.path.join(out_dir, f"{grid}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- plots


def _curve(workdir: str, key: str = "eval_loss") -> tuple[list[int], list[float]]:
    """(steps, values of `key`) from a run's metrics.jsonl: 'eval_loss' at every evaluation,
    'loss' (training, the mean of each `log_every` window) at every log."""
    steps, losses = [], []
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                if key in record:
                    steps.append(record["step"])
                    losses.append(record[key])
    return steps, losses


def _with_best_eval(row: dict[str, Any], workdir: str) -> dict[str, Any]:
    """The row plus 'best_eval_bits_per_byte' (language modelling): the lowest validation
    bits/byte of any evaluation during training, read from the run's metrics.jsonl. Far
    below the final value means the run overfit (e.g. several epochs of a small corpus)."""
    if row["task"] != "lm":
        return row
    _, losses = _curve(workdir)
    return {**row, "best_eval_bits_per_byte": min(losses) / math.log(2)} if losses else row


def plot_results(rows: Sequence[dict[str, Any]], out_dir: str, *, grid: str) -> list[str]:
    """Writes the grid's PNG plots into out_dir; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(rows)
    paths = []

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)

    if grid == "decay_mqar":  # as in Zoology's figures: query accuracy at each test setting
        keys = [k for k in _metric_columns(rows) if k.startswith("acc@")]
        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(keys)), 4))
        for s in summary:
            ax.errorbar(range(len(keys)), [s.get(k, np.nan) for k in keys],
                        yerr=[s.get(k + "_std", np.nan) for k in keys], marker="o",
                        capsize=3, label=f"{s['variant']} ({s['seeds']} seed"
                                         + "s" * (s["seeds"] > 1) + ")")
        ax.set_xticks(range(len(keys)), [k.removeprefix("acc@").replace("-", "\n")
                                         for k in keys])
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("test setting: sequence length, key-value pairs")
        ax.set_ylabel("query accuracy")
        ax.set_title(textwrap.fill(f"{grid}: trained on {summary[0]['setting']}", 70),
                     fontsize="medium")
        ax.legend(fontsize="small")
        save(fig, f"{grid}.png")
        return paths

    metric = "eval_bits_per_byte"
    settings = list(dict.fromkeys(s["setting"] for s in summary))
    variants = list(dict.fromkeys(s["variant"] for s in summary))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(settings) * len(variants) / 2), 4))
    for i, variant in enumerate(variants):
        values = {s["setting"]: s for s in summary if s["variant"] == variant}
        xs = [j + i * width for j, setting in enumerate(settings) if setting in values]
        bars = ax.bar(xs, [values[st][metric] for st in settings if st in values], width,
                      yerr=[values[st][metric + "_std"] for st in settings if st in values],
                      capsize=3, label=variant)
        ax.bar_label(bars, fmt="%.3f", fontsize="x-small", padding=2)
    ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(settings))],
                  settings)
    # Bits per byte differ by a few percent: a zero-based axis would hide them.
    ax.set_ylabel("validation bits per byte")
    low = min(s[metric] - s[metric + "_std"] for s in summary)
    high = max(s[metric] + s[metric + "_std"] for s in summary)
    ax.set_ylim(low - 0.5 * (high - low) - 1e-3, high + 0.3 * (high - low) + 1e-3)
    ax.set_title(f"{grid}: {metric}")
    ax.legend(fontsize="small")
    save(fig, f"{grid}.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    plotted = []                                  # every curve's values, for the y range
    for color, variant in enumerate(variants):   # one colour per variant: seeds thin, mean bold
        workdirs = [os.path.join(out_dir, row["cell"], f"seed{row['seed']}")
                    for row in rows if row["variant"] == variant]
        curves = [_curve(w) for w in workdirs]
        curves = [(steps, np.array(losses) / math.log(2)) for steps, losses in curves if steps]
        for steps, bits in curves:
            ax.plot(steps, bits, color=f"C{color}", alpha=0.3, linewidth=1)
            plotted.append(bits)
        if curves and all(steps == curves[0][0] for steps, _ in curves):
            ax.plot(curves[0][0], np.mean([bits for _, bits in curves], axis=0),
                    color=f"C{color}", marker=".", linewidth=2,
                    label=f"{variant} (mean of {len(curves)})")
        # Training loss, dashed: its gap to validation shows overfitting. A running mean
        # over a 30th of the logs (100 steps of 3,000 at gpu scale) keeps it readable.
        train = [_curve(w, "loss") for w in workdirs]
        if train and train[0][0] and all(steps == train[0][0] for steps, _ in train):
            bits = np.mean([losses for _, losses in train], axis=0) / math.log(2)
            span = max(1, len(bits) // 30)
            bits = np.convolve(bits, np.ones(span) / span, mode="valid")
            ax.plot(train[0][0][span - 1:], bits, color=f"C{color}", linestyle="--",
                    linewidth=1)
            plotted.append(bits[len(bits) // 10:])  # the first steps would set the scale
    if plotted:
        low = min(map(np.min, plotted))
        high = max(map(np.max, plotted))
        ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title(f"{grid}: validation (solid) and training (dashed)")
    ax.legend(fontsize="small")
    save(fig, f"{grid}_curves.png")

    if any(k.startswith("bpb@") for s in summary for k in s):
        fig, ax = plt.subplots(figsize=(6, 4))
        for s in summary:
            keys = sorted((k for k in s if k.startswith("bpb@") and not k.endswith("_std")),
                          key=lambda k: int(k.split("@")[1]))
            lengths = [int(k.split("@")[1]) for k in keys]
            ax.errorbar(lengths, [s[k] for k in keys], yerr=[s[k + "_std"] for k in keys],
                        marker="o", capsize=3, label=s["variant"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("evaluation length (tokens)")
        ax.set_ylabel("validation bits per byte")
        ax.set_title(f"{grid}: length extrapolation ({summary[0]['setting']})")
        ax.legend()
        save(fig, f"{grid}_extrapolation.png")
    return paths
