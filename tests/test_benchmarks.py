"""The benchmark scripts run end to end on the CPU at toy sizes (their numbers are GPU work)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOY_CONFIG = """
import ml_collections
def get_config():
    return ml_collections.ConfigDict(dict(model=dict(
        vocab_size=259, d_model=32, num_layers=1, num_heads=2, chunk_size=16, max_seq_len=64)))
"""


def test_bench_train_weak_scaling_over_device_counts(tmp_path):
    config = tmp_path / "toy.py"
    config.write_text(TOY_CONFIG)
    out = tmp_path / "train.json"
    process = subprocess.run(
        [sys.executable, os.path.join(REPO, "experiments", "bench_train.py"),
         f"--config={config}", "--seq_lens=32", "--tokens_per_step=128", "--steps=2",
         "--windows=2", "--device_counts=1,2", "--models=retnet", "--data=corpus",
         "--matmul_size=256",
         f"--out={out}"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**os.environ, "JAX_NUM_CPU_DEVICES": "2"})
    assert process.returncode == 0, process.stderr
    rows = json.loads(out.read_text())["results"]
    assert [(r["devices"], r["batch"]) for r in rows] == [(1, 4), (2, 8)]  # 128 tokens/device
    assert rows[1]["mesh"] == {"data": 1, "fsdp": 2}
    assert "scaling_efficiency" not in rows[0]
    assert rows[1]["scaling_efficiency"] == pytest.approx(
        rows[1]["tokens_per_s"] / (2 * rows[0]["tokens_per_s"]))
    assert "| scaling efficiency |" in process.stdout
