"""Shardings of params and whole train states (and the engine's params), derived from the parameter specs through the
rule table."""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding

from jaxswift.models.spec import param_specs
from jaxswift.models.vision import VLMConfig, vlm_param_specs
from jaxswift.parallel.rules import partition_spec


def param_logical_axes(params, cfg):
    """Logical axes for every leaf: the spec's where the leaf has the spec's shape (a base weight, plain or inside
    an adapter); adapters' small factors are replicated."""
    specs = vlm_param_specs(cfg) if isinstance(cfg, VLMConfig) else param_specs(cfg)

    def axes(path, leaf):
        node = specs
        for k in path:
            name = getattr(k, "key", None)
            if isinstance(node, dict) and name in node:
                node = node[name]
        if hasattr(node, "shape") and tuple(node.shape) == tuple(leaf.shape):
            return node.logical_axes
        return (None,) * leaf.ndim

    return jax.tree_util.tree_map_with_path(axes, params)


def tree_shardings(tree, cfg, rules, mesh):
    """NamedShardings for a params tree or a whole train state: a leaf with the shape of a parameter (the param, a
    LoRA base, the optimizer's moments of it) takes that parameter's logical axes through the rule table (so fsdp
    shards weights and optimizer state alike); other leaves (adapters, low-rank moments, counters) are replicated."""
    leaves, treedef = jax.tree.flatten(tree)
    axes = treedef.flatten_up_to(param_logical_axes(tree, cfg))
    return treedef.unflatten(NamedSharding(mesh, partition_spec(a, x.shape, rules.params, mesh))
                             for a, x in zip(axes, leaves))


def shard_params(params, cfg, rules, mesh):
    return jax.tree.map(jax.device_put, params, tree_shardings(params, cfg, rules, mesh))
