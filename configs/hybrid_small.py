"""hybrid_small: small.py with retention and softmax attention (3 heads of 64) alternating."""

import pathlib
import runpy

_small = runpy.run_path(str(pathlib.Path(__file__).with_name("small.py")))


def get_config():
    config = _small["get_config"]()
    config.model.layer_schedule = ("retention", "attention") * (config.model.num_layers // 2)
    config.model.num_attention_heads = 3
    return config
