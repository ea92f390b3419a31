#!/usr/bin/env bash
# Runs one ablation grid across the GPUs of one host, one process per GPU (shard i of N on
# GPU i), then writes the grid's complete tables and plots.
#
#   bash experiments/ablate_parallel.sh --grid=decay_lm --scale=gpu --seeds=0,1,2 --out=DIR
#
# N = the GPUs nvidia-smi lists (or $NUM_GPUS). Shard i logs to DIR/shard<i>of<N>.log.
# Do not run several shards on one GPU: on one H100, 9 processes of the gpu-scale grid
# together trained ~145K tokens/s, one process's train step alone does ~754K (BENCHMARKS.md).
set -euo pipefail
n=${NUM_GPUS:-$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)}
out=$(printf '%s\n' "$@" | sed -n 's/^--out=//p')
mkdir -p "${out:?pass --out=DIR}"
pids=()
for i in $(seq 0 $((n - 1))); do
  CUDA_VISIBLE_DEVICES=$i python3 experiments/ablate.py "$@" --shard="$i/$n" \
    > "$out/shard${i}of$n.log" 2>&1 &
  pids+=($!)
done
failed=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { echo "shard $i of $n failed: see $out/shard${i}of$n.log" >&2; failed=1; }
done
[ "$failed" = 0 ] || exit 1
# Every run is done: this reads them back and writes the tables (one GPU, nothing to train).
CUDA_VISIBLE_DEVICES=0 python3 experiments/ablate.py "$@"
