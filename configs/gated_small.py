"""gated_small: small.py with gated retention (gRet, YOCO) in every layer."""

import pathlib
import runpy

_small = runpy.run_path(str(pathlib.Path(__file__).with_name("small.py")))


def get_config():
    config = _small["get_config"]()
    config.model.layer_schedule = ("gated_retention",) * config.model.num_layers
    return config
