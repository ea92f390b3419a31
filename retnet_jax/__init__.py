"""retnet_jax: Retentive Networks and gated retention in JAX / Flax NNX.

Modules, from the maths up (import the one you need):
  retention   parallel, recurrent and chunkwise retention; the one-token step
  positions   decay schedules and the xPos-style rotation
  layers      NNX modules: MultiScaleRetention, GatedRetention, Attention, GatedFFN, RMSNorm
  model       ModelConfig and RetNetLM (any layer schedule), the generation cache API
  generate    prefill + O(1)-state decoding with greedy / temperature / top-k / top-p
  data        byte tokenizer, offline corpora, synthetic recall tasks, resumable batching
  sharding    device mesh and the logical-axis rules table
  checkpoint  Orbax checkpoints
  train       optimizer, sharded train/eval steps, the training loop
  convert     torchscale RetNetDecoder import/export
  ablation    named grids of training runs with tables and plots
"""

__version__ = "0.1.0"
