"""retnet_125m: GPT-3 Small's shape (d 768, 12 layers) with 3 retention heads of key dim 256
(torchscale's head size) and value = FFN width 1296 (27/16 d_model, torchscale's ratio).
124,472,064 parameters; shared settings in base.paper_scale_config."""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
    return _base["paper_scale_config"](d_model=768, num_layers=12, num_heads=3, width=1296,
                                       remat=False)
