"""Plots of the decode and training benchmarks' JSON results (issue 5), for BENCHMARKS.md and
the README.

Each `--decode` file (`bench_decode.py --out`) becomes one figure, every number from that one
process: milliseconds per token against context (one line per model and batch, and XLA
options where a row set any; RetNet's should be flat, the Transformer's KV cache grows with
context; drawn when the file has several contexts) and tokens/s against batch at
`--decode_context` (or the file's largest), each point labelled with the memory its weights,
state and temporaries take. The `--train` files (`bench_train.py --out`) become one
figure: tokens/s per model and sequence length, each bar labelled with its MFU against the
datasheet (one setting timed in several files: the median, and how many); the title counts
the processes the bars come from, as rows of different processes are not timed side by
side.

  python experiments/plot_benchmarks.py --out_dir=/tmp/plots \
      --decode=results/bench/2026-12-03_h200_decode_bf16_state.json
  python experiments/plot_benchmarks.py --out_dir=/tmp/plots --train=a.json,b.json \
      --train_labels=retnet,"gated retnet"

(BENCHMARKS.md has the command that drew results/bench/plots/, under "Decoding"'s figures.)
"""

import collections
import json
import os
import statistics

from absl import app, flags

_DECODE = flags.DEFINE_list("decode", [], "bench_decode.py JSON files, one figure each.")
_TRAIN = flags.DEFINE_list("train", [], "bench_train.py JSON files, one figure for all.")
_TRAIN_LABELS = flags.DEFINE_list("train_labels", None, "One model name per --train file, "
                                  "for files whose rows do not record their mixers.")
_TRAIN_NAME = flags.DEFINE_string("train_name", "train.png", "The training figure's file name.")
_DECODE_CONTEXT = flags.DEFINE_integer("decode_context", 8192, "The context of the "
                                       "throughput panel (the file's largest if it has none).")
_OUT_DIR = flags.DEFINE_string("out_dir", "results/bench/plots", "Where the PNGs go.")

DECODE_FIELDS = ("model", "batch", "context", "ms_per_token", "tokens_per_s", "total_gib")
TRAIN_FIELDS = ("model", "seq_len", "tokens_per_s", "mfu_datasheet")


def load_rows(path: str, fields: tuple[str, ...]) -> tuple[dict, list[dict]]:
    """(the file's header, its timed rows): rows with an error or skipped (bench_decode's
    settings that do not fit) are left out; a file that is not a benchmark's output, or a
    timed row without one of `fields`, is refused by name."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ValueError(f"{path}: not a benchmark's JSON (no 'results' list)")
    rows = [r for r in data["results"] if "error" not in r and "skipped" not in r]
    for r in rows:
        missing = [k for k in fields if r.get(k) is None]
        if missing:
            raise ValueError(f"{path}: a row lacks {missing}: {json.dumps(r)[:200]}")
    if not rows:
        raise ValueError(f"{path}: no timed rows")
    return {k: v for k, v in data.items() if k != "results"}, rows


def refuse_repeats(path: str, keys: list) -> None:
    """One file's rows must each be one setting: two rows with the same key (what a figure
    draws them as) would be drawn on top of each other or averaged unseen."""
    repeated = sorted({k for k in keys if keys.count(k) > 1}, key=str)
    if repeated:
        raise ValueError(f"{path}: several rows of the same setting {repeated}; plot them "
                         "from separate files or tell them apart")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def decode_label(row: dict, batch: bool = True) -> str:
    """'model, batch B' plus the row's XLA options if it set any."""
    options = ", ".join(f"{k}={v}" for k, v in (row.get("compiler_options") or {}).items())
    return ", ".join([row["model"]] + ([f"batch {row['batch']}"] if batch else [])
                     + ([options] if options else []))


def plot_decode(path: str, out_dir: str, context: int) -> tuple[str, int]:
    """One bench_decode file's figure, throughput at `context` (or the file's largest);
    returns (the PNG's path, the points drawn)."""
    header, rows = load_rows(path, DECODE_FIELDS)
    refuse_repeats(path, [(decode_label(r), r["context"]) for r in rows])
    order = {decode_label(r): (r["model"], r["batch"]) for r in rows}
    drawn = 0
    plt = _pyplot()
    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(1, 1 + (len(contexts) > 1), figsize=(6.5 + 6.5 * (
        len(contexts) > 1), 4.5), squeeze=False)
    *by_context, by_batch = axes[0]
    if by_context:
        lines = collections.defaultdict(list)
        for r in rows:
            lines[decode_label(r)].append((r["context"], r["ms_per_token"]))
        ax = by_context[0]
        for label in sorted(lines, key=order.get):
            ax.plot(*zip(*sorted(lines[label])), marker="o", label=label)
            drawn += len(lines[label])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("ms per token")
        ax.set_title("per-token latency against context")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    context = context if context in contexts else contexts[-1]
    models = collections.defaultdict(list)
    for r in rows:
        if r["context"] == context:
            models[decode_label(r, batch=False)].append(r)
    for model, points in sorted(models.items()):
        points.sort(key=lambda r: r["batch"])
        batches = [r["batch"] for r in points]
        by_batch.plot(batches, [r["tokens_per_s"] for r in points], marker="o", label=model)
        drawn += len(points)
        for r in points:
            by_batch.annotate(f"{r['total_gib']:.1f} GiB", (r["batch"], r["tokens_per_s"]),
                              textcoords="offset points", xytext=(4, 4), fontsize=7)
    by_batch.set_xscale("log", base=2)
    by_batch.set_yscale("log")
    by_batch.set_xlabel("batch")
    by_batch.set_ylabel("tokens/s")
    by_batch.set_title(f"throughput at context {context:,} (labels: weights + state + temp)")
    by_batch.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"{os.path.basename(path)}: {header.get('device', '?')}, "
                 f"jax {header.get('jax', '?')}", fontsize=9)
    fig.tight_layout()
    out = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out, drawn


def train_label(row: dict, name: str | None = None) -> str:
    """The bar's model (`name`, or the row's model and its mixers where they are not the
    model's own), with its retention kernel, remat policy and device count where the row
    records them."""
    own = {"retnet": "retention", "transformer": "attention"}.get(row["model"])
    parts = [name or (row["model"] if row.get("mixers", own) == own
                      else f"{row['model']} ({row['mixers']})")]
    if row.get("retention_kernel") not in (None, "xla"):
        parts.append(row["retention_kernel"])
    if "remat" in row:
        parts.append(f"remat {row['remat']}" if row["remat"] else "no remat")
    if row.get("devices", 1) > 1:
        parts.append(f"{row['devices']} devices")
    return ", ".join(parts)


def plot_train(paths: list[str], out_dir: str, names: list[str] | None = None,
               name: str = "train.png") -> tuple[str, int]:
    """All bench_train files' rows as one bar chart (names: one model name per file, or
    None); returns (the PNG's path, the bars drawn)."""
    if names is not None and len(names) != len(paths):
        raise ValueError(f"--train_labels has {len(names)} names for {len(paths)} --train "
                         "files")
    rows, devices = [], set()
    for i, path in enumerate(paths):
        header, found = load_rows(path, TRAIN_FIELDS)
        found = [dict(r, label=train_label(r, names and names[i])) for r in found]
        refuse_repeats(path, [(r["label"], r["seq_len"]) for r in found])
        rows += found
        devices.add(header.get("device", "?"))
    plt = _pyplot()
    seq_lens = sorted({r["seq_len"] for r in rows})
    labels = sorted({r["label"] for r in rows})
    fig, ax = plt.subplots(figsize=(3 + 2.2 * len(seq_lens) * len(labels) / 2, 4.5))
    width, drawn = 0.8 / len(labels), 0
    for i, label in enumerate(labels):
        bars = [(j, [r for r in rows if r["label"] == label and r["seq_len"] == seq_len])
                for j, seq_len in enumerate(seq_lens)]
        bars = [(j, match) for j, match in bars if match]
        for k, (j, match) in enumerate(bars):
            # Rows of one setting from several processes: their median, and how many.
            tokens = statistics.median(r["tokens_per_s"] for r in match)
            mfu = statistics.median(r["mfu_datasheet"] for r in match)
            x = j + (i - (len(labels) - 1) / 2) * width
            ax.bar(x, tokens, width, color=f"C{i}", label=label if k == 0 else None)
            drawn += 1
            runs = f" ({len(match)} runs)" if len(match) > 1 else ""
            ax.annotate(f"{mfu:.1%}{runs}", (x, tokens), ha="center",
                        textcoords="offset points", xytext=(0, 3), fontsize=7)
    ax.set_xticks(range(len(seq_lens)), [f"T = {t:,}" for t in seq_lens])
    ax.set_ylabel("tokens/s (labels: MFU against the datasheet)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"training throughput, {', '.join(sorted(devices))}: rows of {len(paths)} "
                 f"process{'es' if len(paths) > 1 else ''}", fontsize=9)
    fig.tight_layout()
    out = os.path.join(out_dir, name)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out, drawn


def main(argv):
    del argv
    if not _DECODE.value and not _TRAIN.value:
        raise app.UsageError("give --decode and/or --train JSON files")
    os.makedirs(_OUT_DIR.value, exist_ok=True)
    for path in _DECODE.value:
        out, points = plot_decode(path, _OUT_DIR.value, _DECODE_CONTEXT.value)
        print(f"{out}: {points} points")
    if _TRAIN.value:
        out, bars = plot_train(_TRAIN.value, _OUT_DIR.value, _TRAIN_LABELS.value,
                               _TRAIN_NAME.value)
        print(f"{out}: {bars} bars")


if __name__ == "__main__":
    app.run(main)
