"""Shardings of params and whole train states (and the engine's params), derived from the parameter specs through the
rule table."""

from __future__ import annotations

import jax
import numpy as np
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


def serving_kv_copies(cfg, mesh) -> int:
    """How many copies of each kv head the engine keeps on `mesh` (vLLM's way): where `tensor` is a multiple of the
    kv heads and divides the query heads (qwen3-30b-a3b's 4 kv and 32 query heads on tensor=8), each kv head is
    repeated tensor / kv heads times, so every device holds one head's cache instead of all of them; otherwise 1
    (the cache split where the kv heads divide, else replicated)."""
    tensor = mesh.shape.get("tensor", 1) if mesh is not None else 1
    kv = cfg.num_kv_heads
    return tensor // kv if tensor > kv and tensor % kv == 0 and cfg.num_heads % tensor == 0 else 1


def repeat_kv_heads(params, cfg, copies: int):
    """(params, config) whose k/v projections (and biases) repeat each kv head `copies` times in a row: query head
    n reads kv head n // (N / (K * copies)), a copy of the kv head n // (N / K) it read before, so the model computes
    the same function with K * copies kv heads."""
    if copies == 1:
        return params, cfg
    layers = dict(params["layers"])
    for name, axis in (("wk", 2), ("wv", 2), ("bk", 1), ("bv", 1)):
        if name in layers:
            layers[name] = np.repeat(np.asarray(layers[name]), copies, axis=axis)  # small: on the host
    return {**params, "layers": layers}, cfg.replace(num_kv_heads=cfg.num_kv_heads * copies)
