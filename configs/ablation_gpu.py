"""ablation_gpu: the RetNet cell of the gpu-scale `decay_lm` grid as a run config (d_model 512,
6 blocks, 4 heads of key dim 128 and value dim 256, bf16; 3,000 steps of 16 x 1,024 tokens of
the `python` corpus), 22,291,968 parameters. The grid's other variants change the model
section (`retnet_jax.ablation.VARIANTS`).

  python experiments/train.py --config=configs/ablation_gpu.py --workdir=/tmp/ablation_gpu
  python experiments/bench_train.py --config=configs/ablation_gpu.py --seq_lens=1024 --data=corpus
"""

from retnet_jax import ablation


def get_config():
    cell = next(c for c in ablation.make_cells("decay_lm", "gpu") if c.variant == "retnet")
    return ablation.cell_config(cell, "gpu", seed=0)
