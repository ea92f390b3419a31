# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Fixed vs gated decay
#
# RetNet decays its state by a fixed factor per head, `gamma_h = 1 - 2^(-5-h)`. Gated
# retention (gRet, YOCO) learns a decay per token and head, `logsigmoid(x W) / 16`, so it can
# choose what to keep. This notebook trains five models of the same size with
# `retnet_jax.ablation` and compares them:
#
# * **retnet**: fixed multi-scale decay; **gated**: data-dependent decay (YOCO's gate);
# * **gated_bias3**: the same with a learned gate bias starting at 3 (a long initial memory);
# * **transformer**: softmax attention with RoPE (the baseline);
# * **hybrid**: gated retention with attention in every 4th block.
#
# on multi-query associative recall (MQAR, Zoology) and on byte-level language modelling of
# Python's standard library. The 'colab' scale takes a few minutes per model on a Colab GPU;
# `RETNET_TINY=1` runs a seconds-long smoke version (CI does).

# %%
import sys
if "google.colab" in sys.modules:  # install the library in Colab; locally it is already there
    # !pip install -q "retnet_jax @ git+https://github.com/retnet-jax/retnet_jax"
    pass

# %%
import os

import jax
from IPython.display import Image, Markdown, display

from retnet_jax import ablation

TINY = os.environ.get("RETNET_TINY") == "1"
SCALE = "tiny" if TINY else "colab"
VARIANTS = ("retnet", "gated") if TINY else ablation.DECAY_VARIANTS
OUT = "ablation_results"
print(jax.devices(), "scale:", SCALE)

# %% [markdown]
# ## Associative recall (MQAR)
# Key-value pairs, then queries of those keys; accuracy counts only the query positions.
# As in Zoology, each model trains once (on short sequences with few pairs, or a mixture of
# settings) and is tested at each setting on its own, up to longer sequences with more pairs.

# %%
mqar = ablation.run_grid("decay_mqar", f"{OUT}/decay_mqar", scale=SCALE, variants=VARIANTS)
display(Markdown(open(f"{OUT}/decay_mqar/decay_mqar.md").read()))
display(Image(f"{OUT}/decay_mqar/decay_mqar.png"))

# %% [markdown]
# ## Language modelling
# Validation bits per byte on held-out standard-library files (lower is better), and the
# evaluation curves.

# %%
if not TINY:  # the LM grid is covered by the test suite at tiny scale
    lm = ablation.run_grid("decay_lm", f"{OUT}/decay_lm", scale=SCALE, variants=VARIANTS)
    display(Markdown(open(f"{OUT}/decay_lm/decay_lm.md").read()))
    display(Image(f"{OUT}/decay_lm/decay_lm.png"))
    display(Image(f"{OUT}/decay_lm/decay_lm_curves.png"))

# %% [markdown]
# ## What to look for
# * Gated decay should recall better than fixed decay as the number of pairs grows: a fixed
#   decay forgets old pairs at a rate that does not depend on what they are.
# * Attention recalls exactly within its context but costs a KV cache that grows with the
#   context; the hybrid keeps most layers at constant state.
# * Run `python experiments/ablate.py --grid=decay_mqar --scale=gpu --seeds=0,1,2` on a GPU
#   for the full-scale grid.
