"""benchmarks/gpu.py: its CPU smoke run (--tiny) end to end, and the parts that only an accelerator exercises
(device tables, the batch that fills the device) on fakes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_every_figure(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["device"]["backend"] == "cpu" and result["device"]["matmul_tflops_measured"] > 0
    cases = {c["case"]: c for c in result["cases"]}
    assert set(cases) == {"sft tiny", "decode tiny batch 1", "decode tiny batch 32"}, result["cases"]
    sft = cases["sft tiny"]
    assert "error" not in sft, sft.get("traceback")
    assert sft["attn_impl"] == "einsum" and sft["rows"] == 2 and sft["length"] == 64
    assert sft["tokens_per_s"] > 0 and sft["model_tflops_per_step"] > 0 and 0 < sft["mfu_vs_measured_matmul"] < 1
    assert sft["mfu"] is None  # no spec peak for a CPU
    for batch in (1, 32):
        decode = cases[f"decode tiny batch {batch}"]
        assert "error" not in decode, decode.get("traceback")
        assert decode["batch"] == batch and decode["tokens_per_s"] > 0 and decode["bytes_per_step"] > 0
    assert "tokens/s" in run.stdout and "sft tiny" in run.stdout


@pytest.mark.parametrize("kind, peak, hbm", [("NVIDIA H200", 989.0, 4.8), ("NVIDIA H100 80GB HBM3", 989.0, 3.35),
                                             ("NVIDIA H100 PCIe", 756.0, 2.0), ("TPU v5 lite", 197.0, 0.819),
                                             ("TPU v5p", 459.0, 2.765), ("TPU v4", 275.0, 1.2),
                                             ("NVIDIA A100-SXM4-80GB", 312.0, 2.039), ("cpu", None, None)])
def test_device_table(gpu_bench, monkeypatch, kind, peak, hbm):
    monkeypatch.setattr(gpu_bench.jax, "devices", lambda: [SimpleNamespace(device_kind=kind, memory_stats=dict)])
    info = gpu_bench.device_info()
    assert (info["peak_bf16_tflops_spec"], info["hbm_tb_per_s_spec"]) == (peak, hbm)


def test_the_batch_fills_85_percent_of_the_device(gpu_bench, monkeypatch):
    """State 20 GB, 3 GB of temporaries per row, 139 GB device: (0.85 * 139 - 20) / 3 = 32.7 -> 32 rows (a power
    of two, capped by --max_rows); no limit reported (CPU): the base batch."""
    memory = SimpleNamespace(argument_size_in_bytes=20e9, temp_size_in_bytes=4 * 3e9)
    compiled = SimpleNamespace(memory_analysis=lambda: memory)
    args = SimpleNamespace(max_rows=64)
    monkeypatch.setattr(gpu_bench, "memory_stat", lambda key: 139e9 if key == "bytes_limit" else None)
    assert gpu_bench.rows_that_fill(compiled, 4, args) == 32
    assert gpu_bench.rows_that_fill(compiled, 4, SimpleNamespace(max_rows=16)) == 16
    monkeypatch.setattr(gpu_bench, "memory_stat", lambda key: None)
    assert gpu_bench.rows_that_fill(compiled, 4, args) == 4
