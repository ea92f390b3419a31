"""retnet_6_7b: the paper's 6.7B (d 4096, 32 layers, 16 heads) with torchscale retnet_7b's
value = FFN width 6912.
6,715,871,232 parameters; shared settings in base.paper_scale_config."""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
    return _base["paper_scale_config"](d_model=4096, num_layers=32, num_heads=16, width=6912,
                                       remat=True)
