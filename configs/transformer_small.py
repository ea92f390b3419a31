"""transformer_small: the Transformer baseline of small.py, softmax attention in every layer
(3 heads of 64, the same rotation), FFN widened to 520 so the parameter count matches small's
(an attention block has 4 d^2 parameters where retention has 2 d^2 + 3 d * value_dim)."""

import pathlib
import runpy

_small = runpy.run_path(str(pathlib.Path(__file__).with_name("small.py")))


def get_config():
    config = _small["get_config"]()
    config.model.layer_schedule = ("attention",) * config.model.num_layers
    config.model.num_attention_heads = 3
    config.model.ffn_dim = 520
    return config
