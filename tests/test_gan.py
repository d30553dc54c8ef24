import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import diffrax_extras as dxe


def test_lipswish_is_silu_scaled_and_keeps_dtype():
    x = jnp.linspace(-5.0, 5.0, 11)
    np.testing.assert_allclose(dxe.lipswish(x), 0.909 * x / (1 + np.exp(-x)))
    for dtype in (jnp.float16, jnp.float32, jnp.float64):
        assert dxe.lipswish(jnp.ones(3, dtype)).dtype == dtype


def test_lipswish_lipschitz_constant_is_at_most_one():
    # The slope peaks near x = 2.4; a fine grid over a wide range finds the maximum
    # and random pairs check the difference quotient directly.
    x = jnp.linspace(-20.0, 20.0, 400_001, dtype=jnp.float64)
    slopes = jax.vmap(jax.grad(dxe.lipswish))(x)
    largest = float(jnp.max(jnp.abs(slopes)))
    assert 0.999 < largest <= 1.0
    a, b = jr.normal(jr.key(0), (2, 100_000), jnp.float64) * 4
    quotient = jnp.abs(dxe.lipswish(a) - dxe.lipswish(b)) / jnp.abs(a - b)
    assert float(jnp.max(quotient)) <= 1.0


class _Nested(eqx.Module):
    mlp: eqx.nn.MLP
    layers: list
    heads: dict
    scale: jax.Array


def _nested(key):
    k1, k2, k3, k4 = jr.split(key, 4)
    return _Nested(
        mlp=eqx.nn.MLP(3, 5, 16, 2, key=k1),
        layers=[eqx.nn.Linear(4, 8, key=k2), eqx.nn.Conv1d(2, 2, 3, key=k3)],
        heads={"out": eqx.nn.Linear(8, "scalar", key=k4)},
        scale=jnp.array([10.0, -10.0]),
    )


def _scaled(model, factor):
    # Blow every weight and bias up so that clipping has work to do.
    return jax.tree_util.tree_map(
        lambda x: x * factor if eqx.is_inexact_array(x) else x, model
    )


@pytest.mark.parametrize("jit", [False, True])
def test_clip_weights_bounds_hold_and_the_rest_is_untouched(jit):
    model = _scaled(_nested(jr.key(1)), 50.0)
    clip = eqx.filter_jit(dxe.clip_weights) if jit else dxe.clip_weights
    clipped = clip(model)
    linears = [
        (model.mlp.layers[0], clipped.mlp.layers[0], 16),
        (model.mlp.layers[-1], clipped.mlp.layers[-1], 5),
        (model.layers[0], clipped.layers[0], 8),
        (model.heads["out"], clipped.heads["out"], 1),
    ]
    for before, after, out in linears:
        limit = 1.0 / out
        assert float(jnp.max(jnp.abs(after.weight))) <= limit
        # Clipping, not rescaling: weights inside the bounds keep their values.
        inside = jnp.abs(before.weight) <= limit
        np.testing.assert_array_equal(
            jnp.where(inside, after.weight, 0), jnp.where(inside, before.weight, 0)
        )
        np.testing.assert_array_equal(
            after.weight, jnp.clip(before.weight, -limit, limit)
        )
        np.testing.assert_array_equal(after.bias, before.bias)
    # Not a Linear: untouched.
    np.testing.assert_array_equal(clipped.layers[1].weight, model.layers[1].weight)
    np.testing.assert_array_equal(clipped.scale, model.scale)
    assert jax.tree_util.tree_structure(clipped) == jax.tree_util.tree_structure(model)


def test_clip_weights_on_vmapped_layers():
    layers = eqx.filter_vmap(lambda k: eqx.nn.Linear(3, 4, key=k))(
        jr.split(jr.key(2), 5)
    )
    layers = _scaled(layers, 10.0)
    clipped = dxe.clip_weights(layers)
    assert clipped.weight.shape == (5, 4, 3)
    assert float(jnp.max(jnp.abs(clipped.weight))) <= 0.25
    np.testing.assert_array_equal(clipped.bias, layers.bias)
