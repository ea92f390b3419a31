"""small: the default run; trains on a 2-core CPU in about five minutes (~0.8 s per Adam step
on 16 x 128 bytes, measured on a busy 2-core machine), 1,889,088 parameters.

RetNet with torchscale's proportions: key head dim 64, value and FFN width 27/16 d_model.
Variants with other mixers: gated_small.py, transformer_small.py, hybrid_small.py.
"""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
    config = _base["get_base_config"]()
    config.model.update(d_model=192, num_layers=4, num_heads=3, value_dim=324, ffn_dim=324,
                        max_seq_len=512, chunk_size=64)
    return config
