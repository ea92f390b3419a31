"""The session-3 diagnostic behind results/README.md's constant-gate-bias table (not library
code): gated retention on colab-scale MQAR T=64/kv=4, seed 0, with a constant bias c added to
the gate logits, log_decay = logsigmoid(x W_gt + c) / 16, for each c given.

  python results/cpu-colab/diagnostics/gate_bias_probe.py 3 6
"""
import json
import sys

import jax
import jax.numpy as jnp

from retnet_jax import ablation, layers, train

# The colab decay_mqar cell trains on T=64/kv=4 alone (session 8; before, one cell per setting).
cell = next(c for c in ablation.make_cells("decay_mqar", "colab") if c.variant == "gated")
accuracy = {}
for bias in [float(b) for b in sys.argv[1:]]:
    def log_decay(self, x, bias=bias):
        logits = self.gt_proj(x).astype(jnp.float32) + bias
        return jax.nn.log_sigmoid(logits) / self.gate_logit_normalizer
    layers.GatedRetention.log_decay = log_decay
    summary = train.train_and_evaluate(ablation.cell_config(cell, "colab", 0),
                                       f"/tmp/gate_bias_probe/bias{bias}")
    accuracy[bias] = summary["eval_accuracy"]
    print("bias", bias, "initial decay", float(jax.nn.sigmoid(bias) ** (1 / 16)),
          "accuracy", summary["eval_accuracy"], flush=True)
print(json.dumps(accuracy))
