"""Reading a jax.profiler trace back: the device's kernels, and where a call's time went.

Imported by profile_decode.py and bench_train.py (they run with experiments/ on sys.path);
flag-free, so tests import it directly.
"""

import collections
import dataclasses
import glob
import os
import tempfile

import jax
import numpy as np
from jax.profiler import ProfileData

# Host-side ops that only contain other ops (CPU traces time them around their bodies).
_CONTAINERS = ("while", "call", "conditional")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel execution on the device timeline: the HLO instruction it runs (`op`),
    its start and duration in ns."""
    op: str
    start_ns: float
    duration_ns: float


def device_kernels(profile: ProfileData) -> list[Kernel]:
    """The kernels of a trace: events on the first GPU plane's stream lines (one device:
    a multi-device step is summarised on device 0), each named by its
    'hlo_op' stat, or by the kernel's own name when it has none or runs inside a command
    buffer (a CUDA graph, whose kernels all carry the graph's op); with no GPU plane, the
    host's XLA op events (a CPU run), without ops that only contain others (while loops,
    calls)."""
    gpu = [p for p in profile.planes if p.name.startswith("/device:GPU")][:1]  # the first
    kernels = []
    for plane in gpu or [p for p in profile.planes if p.name.startswith("/host:CPU")]:
        for line in plane.lines:
            if gpu and not line.name.startswith("Stream"):
                continue
            for event in line.events:
                op = dict(event.stats).get("hlo_op")
                if gpu and (op is None or str(op).startswith("command_buffer")):
                    op = event.name       # a kernel run inside a CUDA graph: its own name
                if op is None or (not gpu and op.split(".")[0] in _CONTAINERS):
                    continue
                kernels.append(Kernel(str(op), event.start_ns, event.duration_ns))
    return sorted(kernels, key=lambda k: k.start_ns)


def busy_ns(kernels: list[Kernel]) -> float:
    """Length of the union of the kernels' intervals (overlapping kernels count once);
    kernels sorted by start."""
    total, end = 0.0, -np.inf
    for k in kernels:
        stop = k.start_ns + k.duration_ns
        if stop > end:
            total += stop - max(k.start_ns, end)
            end = stop
    return total


def _key(name: str) -> str:
    """A name as kernels and HLO instructions share it: XLA names a fusion's kernel after
    the instruction with '.' written '_' ('loop_add_fusion.3' -> 'loop_add_fusion_3')."""
    return name.replace(".", "_")


def summarize(kernels: list[Kernel], units: int, costs: dict, bandwidth: float,
              top: int, unit: str = "token") -> dict:
    """Times per unit (a decoded token, a train step) of one traced call that ran `units` of
    them: the span from the first kernel's start to the last one's end, the part of it the
    device ran kernels (`busy`) and the rest (`idle`), then by kind and by instruction
    (time, launches, bytes, rate as a fraction of `bandwidth`); keys end in `_per_<unit>`.
    costs: {instruction name: hlo_text.Launch}, matched to the kernels by name (`_key`); a
    kernel matching none is of kind 'other' (library kernels, e.g. cuBLAS', have names of
    their own). XLA may run several instructions of one shape as one kernel (the out and
    FFN-out GEMMs of every block): they count as one row, with that shape's bytes per
    launch and the `source` (`hlo_text.source_of`) of the instruction it is named after."""
    if not kernels:
        raise ValueError("the trace holds no kernel events")
    kernels = sorted(kernels, key=lambda k: k.start_ns)
    span = max(k.start_ns + k.duration_ns for k in kernels) - kernels[0].start_ns
    busy = busy_ns(kernels)
    by_op = collections.defaultdict(lambda: [0.0, 0])
    for k in kernels:
        by_op[k.op][0] += k.duration_ns
        by_op[k.op][1] += 1

    def row(ns: float, count: int, nbytes: int | None) -> dict:
        out = {f"us_per_{unit}": ns / units / 1e3, f"launches_per_{unit}": count / units,
               "us_per_launch": ns / count / 1e3}
        if nbytes:
            out.update({f"mb_per_{unit}": nbytes / units / 1e6,
                        "bandwidth_fraction": nbytes / (ns * 1e-9) / bandwidth})
        return out

    by_key = {_key(name): cost for name, cost in costs.items()}
    ops, kinds = [], collections.defaultdict(lambda: [0.0, 0, 0])
    for op, (ns, count) in by_op.items():
        cost = costs.get(op) or by_key.get(_key(op))
        kind = cost.kind if cost else "other"
        nbytes = cost.bytes * count if cost else None
        ops.append(dict(op=op, kind=kind, **row(ns, count, nbytes),
                        source=cost.source if cost else ""))
        kinds[kind][0] += ns
        kinds[kind][1] += count
        kinds[kind][2] += nbytes or 0
    ops.sort(key=lambda r: -r[f"us_per_{unit}"])
    by_kind = sorted(({"kind": kind, **row(*values)} for kind, values in kinds.items()),
                     key=lambda r: -r[f"us_per_{unit}"])
    starts = np.asarray([k.start_ns for k in kernels])
    ends = np.asarray([k.start_ns + k.duration_ns for k in kernels])
    gaps = np.maximum(starts[1:] - np.maximum.accumulate(ends)[:-1], 0.0)
    return {f"span_us_per_{unit}": span / units / 1e3,
            f"busy_us_per_{unit}": busy / units / 1e3,
            f"idle_us_per_{unit}": (span - busy) / units / 1e3,
            f"kernels_per_{unit}": len(kernels) / units,
            "mean_gap_us": float(np.mean(gaps)) / 1e3 if len(gaps) else 0.0,
            "by_kind": by_kind, "top_ops": ops[:top]}


def trace_call(fn, *args, trace_dir: str) -> tuple[object, ProfileData]:
    """fn(*args) run once under jax.profiler.trace into a fresh subdirectory of trace_dir;
    (its result, the trace)."""
    os.makedirs(trace_dir, exist_ok=True)
    directory = tempfile.mkdtemp(dir=trace_dir)
    with jax.profiler.trace(directory):
        out = jax.block_until_ready(fn(*args))
    paths = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise RuntimeError(f"jax.profiler wrote no .xplane.pb under {directory}")
    return out, ProfileData.from_file(max(paths, key=os.path.getmtime))


def print_summary(summary: dict, unit: str = "token") -> None:
    """`summarize`'s result as two markdown tables: by kind, then the costliest
    instructions with where each came from (`hlo_text.source_of`, up to 90 characters)."""
    print(f"span {summary[f'span_us_per_{unit}']:.1f} = kernels "
          f"{summary[f'busy_us_per_{unit}']:.1f} + idle {summary[f'idle_us_per_{unit}']:.1f} "
          f"us/{unit}, {summary[f'kernels_per_{unit}']:.0f} kernels/{unit}, mean gap "
          f"{summary['mean_gap_us']:.2f} us")
    columns = f"us/{unit} | launches/{unit} | us/launch | MB/{unit} | x copy bandwidth |"
    for title, rows, name in (("kind", summary["by_kind"], "kind"),
                              ("instruction | kind", summary["top_ops"], "op")):
        ops = name == "op"
        print(f"| {title} | {columns}" + (" source |" if ops else ""))
        print("|---" * (title.count("|") + 1) + "|---:" * 5 + "|" + ("---|" if ops else ""))
        for r in rows:
            cells = [r[name]] + ([r["kind"]] if ops else [])
            source = r.get("source", "")
            source = source if len(source) <= 90 else "..." + source[-87:]
            print(f"| {' | '.join(cells)} | {r[f'us_per_{unit}']:.1f} | "
                  f"{r[f'launches_per_{unit}']:.1f} | {r['us_per_launch']:.2f} | "
                  f"{r.get(f'mb_per_{unit}', 0):.1f} | {r.get('bandwidth_fraction', 0):.2f} |"
                  + (f" {source} |" if ops else ""))
