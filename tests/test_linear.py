"""`transformer.matmul_einsum`: a linear layer's einsum as one 2-D matmul.

It must equal the einsum it replaces (values and gradients), leave other equations to jnp.einsum, and keep the
backward free of transposed copies: that layout is what made the SFT step slower than transformers on CPU
(benchmarks/RESULTS.md, "SFT training"), so the compiled HLO is checked, not the wall time.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxswift.models.transformer import matmul_einsum, swiglu

SHAPES = {"B": 2, "T": 5, "D": 6, "F": 7, "N": 3, "H": 4, "V": 9}


def operands(equation: str, seed: int = 0):
    x_spec, w_spec = equation.split("->")[0].split(",")
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal([SHAPES[c] for c in spec]), jnp.float32) for spec in (x_spec, w_spec)]


@pytest.mark.parametrize("equation", [
    "BTD,DF->BTF",     # MLP up / gate
    "BTD,DNH->BTNH",   # q projection: two output axes
    "BTNH,NHD->BTD",   # o projection: two contracted axes
    "BD,DV->BV",       # decode head: one leading axis
    "BTD,FD->BTF",     # weight stored [out, in]: not a linear layer's layout, jnp.einsum as written
    "BTD,DF->TBF",     # output axes reordered: jnp.einsum as written
])
def test_equals_einsum_in_values_and_gradients(equation):
    x, w = operands(equation)
    np.testing.assert_allclose(matmul_einsum(equation, x, w), jnp.einsum(equation, x, w), rtol=1e-6, atol=1e-6)
    ours = jax.grad(lambda x, w: jnp.sum(jnp.sin(matmul_einsum(equation, x, w))), argnums=(0, 1))(x, w)
    ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(jnp.einsum(equation, x, w))), argnums=(0, 1))(x, w)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_float32_accumulation_of_bfloat16_operands():
    x, w = (a.astype(jnp.bfloat16) for a in operands("BTD,DV->BTV"))
    out = matmul_einsum("BTD,DV->BTV", x, w, preferred_element_type=jnp.float32)
    assert out.dtype == jnp.float32 and out.shape == (2, 5, 9)
    np.testing.assert_allclose(out, jnp.einsum("BTD,DV->BTV", x, w, preferred_element_type=jnp.float32),
                               rtol=1e-6)


def transposed_copies(matmul) -> list[str]:
    """The copy / transpose instructions in the compiled forward + backward of a SwiGLU MLP built with `matmul`."""
    B, T, D, F = 4, 64, 64, 192

    def mlp(p, x):
        return matmul("BTF,FD->BTD", swiglu(matmul("BTD,DF->BTF", x, p[0]), matmul("BTD,DF->BTF", x, p[1])), p[2])

    params = [jnp.ones((D, F)), jnp.ones((D, F)), jnp.ones((F, D))]
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(mlp(p, x) ** 2), argnums=(0, 1)))
    hlo = grad.lower(params, jnp.ones((B, T, D))).compile().as_text()
    return [line.strip() for line in hlo.splitlines() if re.search(r"\} (copy|transpose)\(", line)]


def test_mlp_backward_has_no_transposed_copies():
    assert transposed_copies(matmul_einsum) == []
    # the [B, T, ...] einsum it replaced writes activation gradients transposed: the check can fail
    assert transposed_copies(jnp.einsum)


@pytest.mark.parametrize("devices, expected", [(1, False), (2, True)])
def test_recipes_keep_the_2d_form_on_one_device_and_the_einsum_on_a_mesh(devices, expected):
    """The trainers trace their steps under `activation_sharding`, even for `--mesh 1`: one device installs no
    sharding hints, so the step keeps matmul_einsum's 2-D form; several keep the einsum (see its docstring)."""
    from jaxswift.models import hints
    from jaxswift.parallel.mesh import make_mesh
    from jaxswift.parallel.rules import activation_sharding, load_rules

    mesh = make_mesh(f"data={devices}", jax.devices()[:devices])
    with activation_sharding(load_rules(), mesh):
        assert hints.sharded() is expected
        x, w = operands("BTD,DF->BTF")
        hlo = jax.jit(lambda x, w: matmul_einsum("BTD,DF->BTF", x, w)).lower(x, w).as_text()
        o_x, o_w = operands("BTNH,NHD->BTD")  # two contracted axes: merged into one on both paths
        o_out = jax.jit(lambda x, w: matmul_einsum("BTNH,NHD->BTD", x, w))(o_x, o_w)
    assert ("tensor<10x6xf32>" in hlo) is not expected  # the [B*T, D] operand of the 2-D form
    np.testing.assert_allclose(o_out, jnp.einsum("BTNH,NHD->BTD", o_x, o_w), rtol=1e-6, atol=1e-6)
