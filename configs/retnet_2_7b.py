"""retnet_2_7b: the paper's 2.7B (d 2560, 32 layers, 10 heads) with torchscale retnet_3b's
value = FFN width 4280.
2,652,080,640 parameters; shared settings in base.paper_scale_config."""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
    return _base["paper_scale_config"](d_model=2560, num_layers=32, num_heads=10, width=4280,
                                       remat=True)
