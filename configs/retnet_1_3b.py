"""retnet_1_3b: the paper's 1.3B (d 2048, 24 layers, 8 heads) with torchscale retnet_xl's
value = FFN width 3456.
1,323,665,408 parameters; shared settings in base.paper_scale_config."""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
    return _base["paper_scale_config"](d_model=2048, num_layers=24, num_heads=8, width=3456,
                                       remat=True)
