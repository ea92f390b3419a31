"""retnet_1_3b: the paper's 1.3B (d 2048, 24 layers, 8 heads) with torchscale retnet_xl's
value = FFN width 3456.
1,323,665,408 parameters; shared settings in base.paper_scale_config.

Remat keeps the projections' outputs ('projections'): on one H200 at 16,384 tokens a step,
T = 8192, blocks scanned, its step took 9 % less time than full remat's (340.2 against
375.1 ms; BENCHMARKS.md, training, session 15). With the blocks unrolled (since session
19) on one H100 80GB: 338.5 ms, 40.4 % of the bf16 datasheet's FLOP/s, peak 37.4 GiB,
below the 60 GiB that JAX's default 75 % leaves (session 19). The 2.7B and 6.7B keep
'full' remat: their projections' outputs were not measured to fit.

Batch-1 decoding runs its projections through the GEMV kernel (`decode_projections='pallas'`,
XLA's dots with one warning off GPU): at 8K context 1.633 against 1.861 ms a token on an
H100 (1.14x; gated 1.666 against 2.134), 1.470 against 1.738 on an H200 (BENCHMARKS.md,
"Decoding", sessions 16 and 18); with `retention_kernel='pallas'` too, 1.567 ms on an H100
(session 19). Only where timed: the 2.7B's width 4280 is no multiple of
the kernel's 128 columns (its v and gate weights would be padded every step)."""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
    config = _base["paper_scale_config"](d_model=2048, num_layers=24, num_heads=8,
                                         width=3456, remat=True, remat_policy="projections")
    config.model.decode_projections = "pallas"
    return config
