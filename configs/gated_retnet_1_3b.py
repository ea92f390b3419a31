"""gated_retnet_1_3b: retnet_1_3b with gated retention (gRet, YOCO) in every block: the
decay is data-dependent, from a bias-free gate projection (d_model x heads per block).
1,324,058,624 parameters; everything else as retnet_1_3b (remat keeping the projections,
the Pallas decoding step, batch-1 decoding's GEMV projections)."""

import pathlib
import runpy

_here = pathlib.Path(__file__).parent


def get_config():
    config = runpy.run_path(str(_here / "retnet_1_3b.py"))["get_config"]()
    config.model.layer_schedule = ("gated_retention",) * config.model.num_layers
    return config
