"""A group's prompt run once for its G completions (`rollout.shared_prompt_completion_logps`, the GRPO policy's
forward and backward): the same log-probs, entropies and gradients as the G whole rows, through the parent
segments of `transformer.attention_mask`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxswift.errors import ConfigError
from jaxswift.infer.rollout import completion_logps, shared_prompt_completion_logps, shares_prompts
from jaxswift.models.config import ModelConfig
from jaxswift.models.spec import init_params
from jaxswift.models.transformer import attention_mask, hidden_states, init_cache, self_attention

CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5)
G, P, C = 3, 6, 5


def rollout_rows():
    """2 groups x G rows: left-padded prompts (6 and 4 tokens) shared within a group, different completions."""
    rng = np.random.default_rng(0)
    tokens, positions, segments = [], [], []
    for length in (6, 4):
        prompt = rng.integers(1, CFG.vocab_size, length)
        for _ in range(G):
            tokens.append(np.concatenate([np.zeros(P - length), prompt, rng.integers(1, CFG.vocab_size, C)]))
            positions.append(np.concatenate([np.zeros(P - length), np.arange(length), length + np.arange(C)]))
            segments.append(np.concatenate([np.zeros(P - length), np.ones(length + C)]))
    return tuple(jnp.asarray(np.stack(x), jnp.int32) for x in (tokens, positions, segments))


@pytest.mark.parametrize("remat", ["none", "full"])
def test_equals_whole_rows_in_logps_entropies_and_gradients(remat):
    cfg = CFG.replace(remat=remat)
    params = init_params(cfg, jax.random.key(0))
    rows = rollout_rows()
    assert shares_prompts(*map(np.asarray, rows), P, G)
    kw = dict(prompt_length=P, temperature=0.7, with_entropy=True)
    whole = completion_logps(params, *rows, cfg, **kw)
    shared = shared_prompt_completion_logps(params, *rows, cfg, num_generations=G, **kw)
    for a, b in zip(shared, whole):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    weights = jnp.asarray(np.random.default_rng(1).standard_normal((2 * G, C)), jnp.float32)
    loss = lambda f, **k: lambda p: jnp.sum(f(p, *rows, cfg, prompt_length=P, temperature=0.7, **k) * weights)  # noqa: E731
    g_whole = jax.grad(loss(completion_logps))(params)
    g_shared = jax.grad(loss(shared_prompt_completion_logps, num_generations=G))(params)
    for path, a in jax.tree_util.tree_leaves_with_path(g_shared):
        b = dict(jax.tree_util.tree_leaves_with_path(g_whole))[path]
        scale = float(jnp.max(jnp.abs(b))) or 1.0
        np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale, atol=2e-5, err_msg=str(path))


def test_a_branch_sees_its_parent_and_itself_only():
    # one row: prompt (segment 1) at positions 0-1, then two branches (segments 2, 3) at positions 2-3 each
    seg = jnp.asarray([[1, 1, 2, 2, 3, 3]])
    pos = jnp.asarray([[0, 1, 2, 3, 2, 3]])
    parents = jnp.asarray([[0, 0, 1, 1, 1, 1]])
    mask = np.asarray(attention_mask(pos, seg, pos, seg, 0, parents)[0], int)
    np.testing.assert_array_equal(mask, [[1, 0, 0, 0, 0, 0],
                                         [1, 1, 0, 0, 0, 0],
                                         [1, 1, 1, 0, 0, 0],
                                         [1, 1, 1, 1, 0, 0],
                                         [1, 1, 0, 0, 1, 0],
                                         [1, 1, 0, 0, 1, 1]])


def test_parents_are_refused_where_they_cannot_apply():
    params = init_params(CFG, jax.random.key(0))
    tokens, positions, segments = rollout_rows()
    q = jnp.zeros((*tokens.shape, CFG.num_heads, CFG.head_dim))
    kv = jnp.zeros((*tokens.shape, CFG.num_kv_heads, CFG.head_dim))
    with pytest.raises(ConfigError, match="splash masks by segment ids only"):  # refused before the kernel runs
        self_attention(q, kv, kv, positions, segments, 0, impl="splash", parents_BT=segments)

    with pytest.raises(ConfigError, match="not with a KV cache"):
        hidden_states(params, tokens, CFG, positions=positions, segment_ids=segments, parent_segment_ids=segments,
                      cache=init_cache(CFG, tokens.shape[0], 16))
