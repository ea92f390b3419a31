"""retnet_1_3b: the paper's 1.3B (d 2048, 24 layers, 8 heads) with torchscale retnet_xl's
value = FFN width 3456.
1,323,665,408 parameters; shared settings in base.paper_scale_config.

Remat keeps the projections' outputs ('projections'): on one H200 at 16,384 tokens a step,
T = 8192, blocks scanned, its step took 9 % less time than full remat's (340.2 against
375.1 ms; BENCHMARKS.md, training, session 15). With the blocks unrolled (since session
19) on one H100 80GB: 338.5 ms, 40.4 % of the bf16 datasheet's FLOP/s, peak 37.4 GiB,
below the 60 GiB that JAX's default 75 % leaves (session 19). The 2.7B and 6.7B keep
'full' remat: their projections' outputs were not measured to fit.

Decoding runs each token's retention through the Pallas step (`decode_kernel='pallas'`;
training keeps XLA's chunkwise form, faster at these heads) and batch-1 decoding its
projections through the GEMV kernel (`decode_projections='pallas'`; both XLA with one
warning off GPU). At 8K context on an H100: 1.567 ms a token at batch 1 against 1.640 with
XLA's step and 1.832 with XLA's step and GEMMs (session 19); the Pallas step 2.133 against
2.203 ms at batch 8, 4.042 against 4.500 at 32, 6.623 against 7.341 at 64 (session 19);
gated 1.639 against 1.666 and 2.134 at batch 1 (session 18); GEMV projections 1.470
against 1.738 on an H200 (BENCHMARKS.md, "Decoding", sessions 16, 18, 19). Only where
timed: the 2.7B's width 4280 is no multiple of the GEMV's 128 columns (its v and gate
weights would be padded every step) nor its value heads (428) of the step's 16."""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config():
    config = _base["paper_scale_config"](d_model=2048, num_layers=24, num_heads=8,
                                         width=3456, remat=True, remat_policy="projections")
    config.model.update(decode_kernel="pallas", decode_projections="pallas")
    return config
