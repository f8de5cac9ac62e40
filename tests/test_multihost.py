"""Multi-process training: two JAX processes on localhost (4 virtual CPU devices each, gloo collectives) form one
8-device mesh and train exactly like one 8-device process; launch settings from flags and environment."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxswift.errors import ConfigError
from jaxswift.parallel.distributed import SINGLE_PROCESS, Launch, detected_cluster, resolve_launch
from jaxswift.parallel.mesh import ensure_cpu_devices
from jaxswift.train.args import SftArguments, parse_args
from jaxswift.train.sft import run_sft

MESH = "data=2,fsdp=2,tensor=2"
PROCESS_TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def sft_flags(model, out) -> list[str]:
    return ["--model", str(model), "--output_dir", str(out), "--max_steps", "3", "--logging_steps", "1",
            "--learning_rate", "1e-3", "--max_length", "128", "--demo_question", "", "--disable_tqdm", "true",
            "--save_steps", "1000", "--lr_scheduler_type", "constant", "--tuner_type", "full", "--mesh", MESH]


def launch_two_processes(flags: list[str], port: int, recipe: str = "sft", *, per_process=((), ()),
                         env_extra=None) -> list[subprocess.CompletedProcess]:
    """Runs `python -m jaxswift.recipes.<recipe>` as processes 0 and 1 of a 2-process job (per_process: extra flags of
    each, given after the common ones)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the recipe picks 8 / 2 devices per process
    env.update(JAX_PLATFORMS="cpu", **(env_extra or {}))
    procs = [subprocess.Popen([sys.executable, "-m", f"jaxswift.recipes.{recipe}", *flags,
                               "--coordinator_address", f"localhost:{port}", "--num_processes", "2",
                               "--process_id", str(i), *per_process[i]], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=PROCESS_TIMEOUT_S)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def test_two_processes_train_like_one_eight_device_process(tiny_chat_model, tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    for i, result in enumerate(launch_two_processes(sft_flags(tiny_chat_model, multi), free_port())):
        assert result.returncode == 0, f"process {i} failed:\n{result.stdout[-4000:]}"
        assert "mesh data=2 x fsdp=2 x tensor=2" in result.stdout  # one 8-device mesh across both processes
    reference = run_sft(parse_args(SftArguments, sft_flags(tiny_chat_model, single)), progress=False)

    records = [json.loads(line) for line in (multi / "logging.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]  # written once (by process 0), not once per process
    losses = np.array([r["loss"] for r in records])
    np.testing.assert_allclose(losses, list(reference.losses.values()), rtol=1e-5)
    assert sorted(p.name for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
    exported, expected = load_file(multi / "model" / "model.safetensors"), load_file(single / "model" /
                                                                                    "model.safetensors")
    assert exported.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(exported[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_launch_from_flags_and_environment():
    assert resolve_launch(environ={}, cluster="") == SINGLE_PROCESS
    assert resolve_launch("h:1", 1, 0, environ={}, cluster="") == SINGLE_PROCESS
    flags = resolve_launch("10.0.0.1:1234", 4, 3, environ={}, cluster="")
    assert flags.num_processes == 4 and flags.kwargs == dict(coordinator_address="10.0.0.1:1234", num_processes=4,
                                                             process_id=3)
    env = {"JAXSWIFT_COORDINATOR": "node0:99", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert resolve_launch(environ=env, cluster="").kwargs == dict(coordinator_address="node0:99", num_processes=2,
                                                                  process_id=1)
    assert resolve_launch(process_id=0, environ=env, cluster="").kwargs["process_id"] == 0  # flags win


@pytest.mark.parametrize("kwargs, environ, message", [
    (dict(coordinator_address="h:1", num_processes=2), {}, "--process_id not set"),
    (dict(num_processes=2, process_id=0), {}, "--coordinator_address not set"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), {}, "--process_id 2: must lie in [0, "),
    (dict(coordinator_address="nohost", num_processes=2, process_id=0), {}, "expected HOST:PORT"),
    (dict(coordinator_address="h:1", num_processes=0, process_id=0), {}, "--num_processes must be positive"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES='two': expected an integer"),
])
def test_bad_launch_settings_name_the_flag(kwargs, environ, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        resolve_launch(**kwargs, environ=environ, cluster="")


def test_mesh_devices_are_split_over_processes(monkeypatch):
    monkeypatch.setattr("jaxswift.parallel.mesh._backend_started", lambda: False)
    monkeypatch.setattr("jaxswift.parallel.mesh._has_accelerator", lambda: False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "")
    ensure_cpu_devices(MESH, num_processes=2)
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"
    with pytest.raises(ConfigError, match=r"--mesh 'data=2,tensor=3': its 6 devices cannot be split evenly over "
                                          r"--num_processes 4"):
        ensure_cpu_devices("data=2,tensor=3", num_processes=4)


@pytest.mark.parametrize("tasks, expected", [("4", 4), ("1", 1)])
def test_slurm_job_is_detected_without_flags(monkeypatch, tasks, expected):
    slurm = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[1-4]", "SLURM_NTASKS": tasks, "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": tasks}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    assert detected_cluster() == "slurm"
    launch = resolve_launch()
    assert launch.num_processes == expected
    assert launch == (SINGLE_PROCESS if expected == 1 else Launch(expected, {}, "slurm"))  # jax reads SLURM itself


def test_no_cluster_no_flags_is_one_process(monkeypatch):
    for name in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_", "JAX_", "JAXSWIFT_", "TPU_"))]:
        monkeypatch.delenv(name)
    assert detected_cluster() is None and resolve_launch() == SINGLE_PROCESS
