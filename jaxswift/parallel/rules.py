"""Logical-axis rule tables (jaxswift/sharding/*.yaml): the only place where model axes meet mesh axes."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from pathlib import Path

import jax
import yaml
from jax.sharding import NamedSharding, PartitionSpec

from jaxswift.errors import ConfigError
from jaxswift.models import hints
from jaxswift.parallel.mesh import MESH_AXES

log = logging.getLogger(__name__)
RULES_DIR = Path(__file__).resolve().parents[1] / "sharding"  # jaxswift/sharding, shipped in the wheel
LOGICAL_AXES = ("batch", "seq", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "experts", "layers",
                "norm", "lora_rank")


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    params: dict  # logical axis -> tuple of mesh axes
    activations: dict
    source: str = ""


def _mesh_axes(value, where: str) -> tuple[str, ...]:
    if value is not None and not isinstance(value, (str, list)):
        raise ConfigError(f"{where}: expected a mesh axis, a list of mesh axes or null, got {value!r}")
    axes = () if value is None else (value,) if isinstance(value, str) else tuple(value)
    for axis in axes:
        if axis not in MESH_AXES:
            raise ConfigError(f"{where}: unknown mesh axis {axis!r} (mesh axes: {', '.join(MESH_AXES)})")
    if len(set(axes)) < len(axes):
        raise ConfigError(f"{where}: a mesh axis appears twice in {list(axes)}")
    return axes


def _table(raw, where: str) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of logical axis -> mesh axes")
    table = {}
    for logical, value in raw.items():
        if logical not in LOGICAL_AXES:
            raise ConfigError(f"{where}: unknown logical axis {logical!r} (logical axes: {', '.join(LOGICAL_AXES)})")
        table[logical] = _mesh_axes(value, f"{where}.{logical}")
    return table


def load_rules(name_or_path: str = "default") -> ShardingRules:
    """A rule table by name (a file in jaxswift/sharding/) or by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RULES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in RULES_DIR.glob("*.yaml"))
        raise ConfigError(f"--sharding_rules {name_or_path!r}: no such file {path} (built-in: {', '.join(known)})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--sharding_rules {path}: invalid YAML ({e})") from None
    unknown = set(raw) - {"params", "activations"}
    if unknown:
        raise ConfigError(f"--sharding_rules {path}: unknown sections {sorted(unknown)} "
                          f"(expected params, activations)")
    where = f"--sharding_rules {path}"
    return ShardingRules(_table(raw.get("params", {}), f"{where}: params"),
                         _table(raw.get("activations", {}), f"{where}: activations"), where)


def rules_for_mesh(name_or_path: str, mesh) -> ShardingRules:
    """`--sharding_rules` for this mesh: "default" becomes the table its parallel axes need — sequence.yaml
    (activations split along seq) when sequence > 1, moe.yaml (experts and rows over `expert`) when expert > 1;
    a table the user named is kept as given."""
    if name_or_path == "default":
        if mesh.shape["sequence"] > 1:
            if mesh.shape["expert"] > 1:
                raise ConfigError("--mesh with both sequence and expert axes: no built-in rule table covers both; "
                                  "pass --sharding_rules PATH (see sharding/sequence.yaml and sharding/moe.yaml)")
            name_or_path = "sequence"
        elif mesh.shape["expert"] > 1:
            name_or_path = "moe"
    return load_rules(name_or_path)


def data_parallel_size(rules: ShardingRules, mesh) -> int:
    """How many ways the rule table splits batch rows on this mesh (data x fsdp by default; x expert for MoE)."""
    return math.prod(mesh.shape[a] for a in rules.activations.get("batch", ()))


def partition_spec(logical: tuple, shape: tuple, table: dict, mesh, where: str = "") -> PartitionSpec:
    """Maps logical axes to mesh axes (size-1 mesh axes dropped); a mesh axis that does not divide the dimension
    is dropped too (replicated). A mesh axis named twice in one spec is an error in the rule table."""
    out = []
    for axis, dim in zip(logical, shape):
        mesh_axes = tuple(a for a in table.get(axis, ()) if mesh.shape[a] > 1)
        if mesh_axes and dim % math.prod(mesh.shape[a] for a in mesh_axes):
            log.info("dimension %s=%d not divisible by mesh axes %s: replicated", axis, dim, mesh_axes)
            mesh_axes = ()
        out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    spec = PartitionSpec(*out)
    validate_spec(spec, where or f"logical axes {logical}")
    return spec


def validate_spec(spec: PartitionSpec, where: str):
    seen = []
    for entry in spec:
        for axis in (entry,) if isinstance(entry, str) else (entry or ()):
            if axis in seen:
                raise ConfigError(f"{where}: mesh axis {axis!r} appears twice in {spec}")
            seen.append(axis)


def param_shardings(logical_tree, shapes_tree, rules: ShardingRules, mesh):
    """NamedShardings for a params tree, given its logical axes and shapes (arrays or ShapeDtypeStructs)."""
    def one(path, axes, x):
        where = f"{rules.source}: parameter {jax.tree_util.keystr(path)} {axes}"
        return NamedSharding(mesh, partition_spec(axes, x.shape, rules.params, mesh, where))
    return jax.tree_util.tree_map_with_path(one, logical_tree, shapes_tree, is_leaf=lambda t: isinstance(t, tuple))


def activation_constraint(rules: ShardingRules, mesh):
    """The function `models.hints.constrain` calls: logical activation axes -> sharding constraint."""
    def constrain(x, logical):
        spec = partition_spec(logical, x.shape, rules.activations, mesh)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return constrain


@contextlib.contextmanager
def activation_sharding(rules: ShardingRules, mesh, options=None):
    """Context manager: model code traced inside it pins activations at block boundaries and runs the parallel
    strategy of each mesh axis (pipeline, ring attention, expert parallelism: `parallel/strategies.py`);
    `options` is a strategies.ParallelOptions (defaults when None)."""
    from jaxswift.parallel.strategies import use_parallel

    # one device: nothing to pin, and the model keeps its one-device layouts (transformer.matmul_einsum)
    constraint = activation_constraint(rules, mesh) if mesh.devices.size > 1 else None
    with hints.use_constraint(constraint), use_parallel(mesh, rules, options):
        yield


def batch_sharding(rules: ShardingRules, mesh, ndim: int = 2) -> NamedSharding:
    """[B, T, ...] batches: batch over the rules' batch axes, the rest replicated."""
    batch_axes = tuple(a for a in rules.activations.get("batch", ()) if mesh.shape[a] > 1)
    first = None if not batch_axes else batch_axes[0] if len(batch_axes) == 1 else batch_axes
    return NamedSharding(mesh, PartitionSpec(first, *([None] * (ndim - 1))))
