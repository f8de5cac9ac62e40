"""Multi-process runs: one JAX process per host (or per GPU), all of them forming one global mesh.

`initialize_distributed` calls `jax.distributed.initialize` before JAX starts its backend, from the flags
(`--coordinator_address`, `--num_processes`, `--process_id`), else from the environment (JAXSWIFT_COORDINATOR or
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), else from JAX's own cluster detection on a Cloud TPU
pod, under SLURM (`srun`) or Open MPI (`mpirun`). With none of these it does nothing: one process.

Every process runs the same program on the same data: each builds the same global batch and copies only the rows
its own devices hold (`put_global_batch`); checkpoints are saved by all processes together (orbax), and only the
primary process (0) writes logs, plots and the final HF/PEFT export (`is_primary`, `gather_to_host`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Mapping

import jax

from jaxswift.errors import ConfigError
from jaxswift.parallel.mesh import ensure_cpu_devices

log = logging.getLogger(__name__)

COORDINATOR_ENV = ("JAXSWIFT_COORDINATOR", "JAX_COORDINATOR_ADDRESS")
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
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
    log.info("joining a %d-process job (%s)", launch.num_processes, launch.source)
    jax.distributed.initialize(**launch.kwargs)
    return jax.process_count()


def single_process(recipe: str, args) -> None:
    """For recipes that do not join multi-process jobs yet (rlhf, grpo): a clear error when the flags or the
    environment ask for several processes, then this process's CPU devices as usual."""
    launch = resolve_launch(args.coordinator_address, args.num_processes, args.process_id)
    if launch.num_processes > 1:
        raise ConfigError(f"jaxswift {recipe} runs in one process for now ({launch.num_processes} processes asked "
                          f"by {launch.source}); multi-process training is `jaxswift sft` only")
    ensure_cpu_devices(args.mesh)


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
