"""tiny: a few seconds on a CPU; for smoke tests and notebooks in CI (132,800 parameters)."""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
    config = _base["get_base_config"]()
    config.model.update(d_model=64, num_layers=2, num_heads=2, value_dim=108, ffn_dim=108,
                        max_seq_len=256, chunk_size=32)
    return config
