"""retnet_350m: GPT-3 Medium's shape (d 1024, 24 layers) with torchscale retnet_medium's
4 heads and value = FFN width 1728.
356,697,088 parameters; shared settings in base.paper_scale_config."""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
    return _base["paper_scale_config"](d_model=1024, num_layers=24, num_heads=4, width=1728,
                                       remat=False)
