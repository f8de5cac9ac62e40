"""Multi-process runs: one JAX process per host (or per GPU), all of them forming one global mesh.

`initialize_distributed` calls `jax.distributed.initialize` before JAX starts its backend, from the flags
(`--coordinator_address`, `--num_processes`, `--process_id`), else from the environment (JAXSWIFT_COORDINATOR or
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), else from JAX's own cluster detection on a Cloud TPU
pod, under SLURM (`srun`) or Open MPI (`mpirun`). With none of these it does nothing: one process.

Every process runs the same program on the same data: each builds the same global batch and copies only the rows
its own devices hold (`put_global_batch`); checkpoints are saved by all processes together (orbax), and only the
primary process (0) writes logs, plots and the final HF/PEFT export (`is_primary`, `gather_to_host`).

Every process must be started with the same flags (`--process_id` aside): `check_same_flags` compares them once
the job has formed. Process 0 waits `JAXSWIFT_INIT_TIMEOUT_S` seconds (default 300) for the others to connect;
jax then ends every process, so the line written before joining says which flags to check.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
from typing import Mapping

import jax
import numpy as np

from jaxswift.errors import ConfigError
from jaxswift.parallel.mesh import ensure_cpu_devices

log = logging.getLogger(__name__)

COORDINATOR_ENV = ("JAXSWIFT_COORDINATOR", "JAX_COORDINATOR_ADDRESS")
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
INIT_TIMEOUT_ENV = "JAXSWIFT_INIT_TIMEOUT_S"  # how long the processes wait for each other to connect
DEFAULT_INIT_TIMEOUT_S = 300
AUTO_CLUSTERS = ("ompi", "slurm", "tpu", "gcetpu", "gketpu")  # jax's cluster names we let it detect


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins the job: the arguments of jax.distributed.initialize, and the job's process count."""

    num_processes: int
    kwargs: dict  # {} with num_processes > 1: jax detects everything from the cluster (`source`)
    source: str  # "flags/env", a jax cluster name, or "single process"


SINGLE_PROCESS = Launch(1, {}, "single process")


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r}: expected an integer") from None


def resolve_launch(coordinator_address: str | None = None, num_processes: int | None = None,
                   process_id: int | None = None, environ: Mapping[str, str] | None = None,
                   cluster: str | None = None) -> Launch:
    """Flags first, then the environment; with neither, `cluster` (a detected jax cluster name) or one process.
    `cluster=None` asks `detected_cluster()`."""
    environ = os.environ if environ is None else environ
    coordinator_address = coordinator_address or next((environ[k] for k in COORDINATOR_ENV if environ.get(k)), None)
    num_processes = num_processes if num_processes is not None else _env_int(environ, NUM_PROCESSES_ENV)
    process_id = process_id if process_id is not None else _env_int(environ, PROCESS_ID_ENV)
    given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
             "--process_id": process_id}
    if all(v is None for v in given.values()):
        cluster = cluster if cluster is not None else detected_cluster()
        if not cluster:
            return SINGLE_PROCESS
        count = _cluster_process_count(cluster)
        return Launch(count, {}, cluster) if count > 1 else SINGLE_PROCESS
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"--num_processes must be positive, got {num_processes}")
    if num_processes == 1:
        return SINGLE_PROCESS
    missing = [flag for flag, value in given.items() if value is None]
    if missing:
        raise ConfigError(f"multi-process run: {', '.join(missing)} not set (flags, or the environment variables "
                          f"{' / '.join(COORDINATOR_ENV)}, {NUM_PROCESSES_ENV}, {PROCESS_ID_ENV})")
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"--process_id {process_id}: must lie in [0, --num_processes {num_processes})")
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--coordinator_address {coordinator_address!r}: expected HOST:PORT (process 0's "
                          f"address, e.g. 10.0.0.1:1234)")
    return Launch(num_processes, dict(coordinator_address=coordinator_address, num_processes=num_processes,
                                      process_id=process_id), "flags/env")


def detected_cluster() -> str | None:
    """The managed cluster jax.distributed can configure itself from (Cloud TPU pod, SLURM, Open MPI), or None.
    Uses jax's own detectors (a private module: if it moved, no detection)."""
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:
        return None
    for env in ClusterEnv._cluster_types:
        if env.name in AUTO_CLUSTERS and not env.opt_in_only_method and env.is_env_present():
            return env.name
    return None


def _cluster_process_count(name: str) -> int:
    from jax._src.clusters import ClusterEnv

    env = next(e for e in ClusterEnv._cluster_types if e.name == name)
    return int(env.get_process_count())


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, mesh: str | None = None) -> int:
    """Joins the multi-process job (see the module docstring) and returns its process count; call it first, before
    any JAX computation. On a CPU-only machine it first asks XLA for this process's share of the `--mesh` devices
    (the mesh counts global devices: each of N processes gets mesh size / N virtual devices)."""
    launch = resolve_launch(coordinator_address, num_processes, process_id)
    ensure_cpu_devices(mesh, launch.num_processes)
    if jax.distributed.is_initialized():
        return jax.process_count()
    if launch.num_processes == 1:
        return 1
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes reduce over TCP (gloo)
    timeout = init_timeout_s()
    # jax ends the process (no Python exception) when the others do not all connect in time: say first what to check
    print(f"jaxswift: joining a {launch.num_processes}-process job ({launch.source}"
          + (f", coordinator {launch.kwargs['coordinator_address']}, process {launch.kwargs['process_id']}"
             if launch.kwargs else "")
          + f"); waiting up to {timeout} s ({INIT_TIMEOUT_ENV}) for all of them to connect. If this process is ended "
          f"with DEADLINE_EXCEEDED, not all {launch.num_processes} processes of --num_processes "
          f"{launch.num_processes} were started, or they were given different --num_processes / "
          "--coordinator_address", file=sys.stderr, flush=True)
    jax.distributed.initialize(**launch.kwargs, initialization_timeout=timeout)
    if jax.process_count() != launch.num_processes:
        raise ConfigError(f"--num_processes {launch.num_processes}, but the job this process joined has "
                          f"{jax.process_count()} processes (as its coordinator, process 0, was told): give every "
                          "process the same --num_processes")
    return jax.process_count()


def init_timeout_s(environ: Mapping[str, str] | None = None) -> int:
    """Seconds the processes wait for each other to connect: JAXSWIFT_INIT_TIMEOUT_S, else 300."""
    value = _env_int(os.environ if environ is None else environ, INIT_TIMEOUT_ENV)
    if value is None:
        return DEFAULT_INIT_TIMEOUT_S
    if value < 1:
        raise ConfigError(f"environment variable {INIT_TIMEOUT_ENV}={value}: expected a positive number of seconds")
    return value


PER_PROCESS_FLAGS = ("process_id",)  # the one flag that differs between the processes of a job


def flag_digests(args) -> np.ndarray:
    """[fields] 31-bit digests of a run's flags (one per dataclass field, in field order)."""
    values = dataclasses.asdict(args)
    return np.array([0 if name in PER_PROCESS_FLAGS else
                     int.from_bytes(hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode())
                                    .digest()[:4], "little") >> 1
                     for name, value in values.items()], np.int32)


def check_same_flags(args) -> None:
    """Every process of a job must run with the same flags (a different batch size, dataset or mesh in one of them
    would leave the others waiting in a collective, or train on a batch that does not add up): the flags that
    differ are named, in every process at once. One process: nothing to compare."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digests = np.asarray(multihost_utils.process_allgather(flag_digests(args)))  # [processes, fields]
    names = [f.name for f in dataclasses.fields(args)]
    differ = [f"--{names[i]}" for i in np.flatnonzero((digests != digests[0]).any(axis=0))]
    if differ:
        mine = ", ".join(f"{flag} {getattr(args, flag[2:])!r}" for flag in differ)
        raise ConfigError(f"the {jax.process_count()} processes were started with different {', '.join(differ)} "
                          f"(process {jax.process_index()} has {mine}); every process of a job needs the same flags "
                          "(--process_id aside)")


def is_primary() -> bool:
    """The process that writes logs, plots and exports (process 0)."""
    return jax.process_index() == 0


def put_global_batch(batch: dict, sharding) -> dict:
    """A host batch (the same global numpy arrays in every process) -> global jax Arrays; each process copies only
    the rows its own devices hold."""
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index]) for k, v in batch.items()}


def process_rows(sharding, rows: int) -> tuple[int, int]:
    """[first, last): the block of a batch's rows (axis 1 of [A, B, T]) that this process's devices hold, so its
    data loader assembles only those. The whole batch in a one-process run."""
    if jax.process_count() == 1:
        return 0, rows
    held = set()
    for index in sharding.addressable_devices_indices_map((1, rows, 1)).values():
        held.update(range(*index[1].indices(rows)))
    first, last = min(held), max(held) + 1
    if len(held) != last - first:
        raise ConfigError(f"this process holds rows {sorted(held)} of each batch, not one contiguous block; use a "
                          "mesh whose data axes follow the process order")
    return first, last


def held_rows(sharding, rows: int) -> np.ndarray:
    """[rows] bool: the rows of a [rows, ...] array split by `sharding` (over its leading axis) that this process's
    devices hold. Every row in a one-process run."""
    held = np.zeros(rows, bool)
    for index in sharding.addressable_devices_indices_map((rows,)).values():
        held[index[0]] = True
    return held


def put_process_batch(local: dict, sharding, rows: int) -> dict:
    """This process's rows ([A, last - first, T], see `process_rows`) -> global [A, rows, T] jax Arrays."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0], rows, *v.shape[2:]))
            for k, v in local.items()}


def gather_to_host(tree):
    """A tree of (possibly cross-process) arrays as host numpy arrays in every process. Collective: every process
    must call it. One process: the arrays are returned as they are."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def share_rows(values: np.ndarray, owned: np.ndarray) -> np.ndarray:
    """values [N, ...] of which this process computed the rows where `owned` [N] is true (the rest are ignored)
    -> the [N, ...] values of every process's rows, in every process; each row is copied from a process that
    computed it (no arithmetic: the same values as one process computing them all). Collective."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    values = np.ascontiguousarray(values)
    raw = values.reshape(len(values), -1).view(np.uint8)  # sent as bytes: float64 stays float64 (jax has no x64)
    every_raw, every_owned = (np.asarray(x) for x in multihost_utils.process_allgather(
        (raw, np.asarray(owned, np.int32))))  # [processes, N, bytes], [processes, N]
    missing = np.flatnonzero(every_owned.max(axis=0) == 0)
    if len(missing):
        raise ValueError(f"rows {missing.tolist()} were computed by no process")
    owner = np.argmax(every_owned, axis=0)
    rows = np.ascontiguousarray(every_raw[owner, np.arange(len(owner))])
    return rows.view(values.dtype).reshape(values.shape)
