"""Brownian increments with Lévy areas: Chen's relation and the exact Brownian bridge.

An increment over an interval of length $h$ is held as $(h, W, \bar{H}, \bar{K})$ with
$\bar{H} = hH$ and $\bar{K} = h^2K$, where $H$ and $K$ are the space-time and
space-time-time Lévy areas (Foster's thesis, Definition 4.2.1). In these rescaled
variables Chen's relation is polynomial in the interval lengths, so concatenation,
difference and the bridge need no division by a possibly tiny length. The formulas
are those of `diffrax.VirtualBrownianTree` (Foster's thesis, Theorem 6.1.4, and
Jelinčič, Foster and Kidger 2024, Theorem 3.7), written for one interval at a time.
"""

import math

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from diffrax import (
    BrownianIncrement,
    SpaceTimeLevyArea,
    SpaceTimeTimeLevyArea,
)
from jaxtyping import Array, Inexact, PRNGKeyArray, Real


LevyAreaType = type[BrownianIncrement | SpaceTimeLevyArea | SpaceTimeTimeLevyArea]
_NUM_NORMALS = {BrownianIncrement: 1, SpaceTimeLevyArea: 2, SpaceTimeTimeLevyArea: 3}


class Levy(eqx.Module):
    """The increment of one PyTree leaf of Brownian motion over an interval.

    `bar_H` is `None` unless space-time Lévy area is configured, and `bar_K` is `None`
    unless space-time-time Lévy area is.
    """

    dt: Real[Array, ""]
    W: Inexact[Array, " *shape"]
    bar_H: Inexact[Array, " *shape"] | None
    bar_K: Inexact[Array, " *shape"] | None


def real_dtype(dtype) -> jnp.dtype:
    """The real dtype matching `dtype` (float32 for complex64, and so on)."""
    return jnp.finfo(dtype).dtype


def _cast(x, like: Array) -> Array:
    # To the leaf's own dtype (complex included): a real coefficient then multiplies
    # a complex leaf without implicit promotion.
    return jnp.astype(x, like.dtype)


def num_normals(levy_area: LevyAreaType) -> int:
    """Standard normals per array element that one increment or one bridge needs."""
    return _NUM_NORMALS[levy_area]


def zero(like: Levy) -> Levy:
    """The increment over an empty interval."""
    return Levy(
        dt=jnp.zeros_like(like.dt),
        W=jnp.zeros_like(like.W),
        bar_H=None if like.bar_H is None else jnp.zeros_like(like.bar_H),
        bar_K=None if like.bar_K is None else jnp.zeros_like(like.bar_K),
    )


def zeros(struct, levy_area: LevyAreaType, time_dtype) -> Levy:
    """The increment over an empty interval, for one leaf of a path's `shape`."""
    n = num_normals(levy_area)
    z = jnp.zeros(struct.shape, struct.dtype)
    return Levy(
        dt=jnp.zeros((), time_dtype),
        W=z,
        bar_H=z if n >= 2 else None,
        bar_K=z if n >= 3 else None,
    )


def concatenate(x: Levy, y: Levy) -> Levy:
    """Chen's relation: the increment over $[s, u]$ from those over $[s, t]$ and
    $[t, u]$."""
    h1, h2 = x.dt, y.dt
    w = x.W + y.W
    if x.bar_H is None:
        return Levy(h1 + h2, w, None, None)
    assert y.bar_H is not None
    c1, c2 = _cast(h1, x.W), _cast(h2, x.W)
    cross = c2 * x.W - c1 * y.W
    bar_h = x.bar_H + y.bar_H + 0.5 * cross
    if x.bar_K is None:
        return Levy(h1 + h2, w, bar_h, None)
    assert y.bar_K is not None
    bar_k = (
        x.bar_K
        + y.bar_K
        + (c2 / 2) * x.bar_H
        - (c1 / 2) * y.bar_H
        + ((c2 - c1) / 12) * cross
    )
    return Levy(h1 + h2, w, bar_h, bar_k)


def difference(x: Levy, z: Levy) -> Levy:
    """The inverse of `concatenate`: the increment over $[t, u]$ from those over
    $[s, t]$ (`x`) and $[s, u]$ (`z`)."""
    h1, h = x.dt, z.dt
    w = z.W - x.W
    if x.bar_H is None:
        return Levy(h - h1, w, None, None)
    assert z.bar_H is not None
    c1, c = _cast(h1, x.W), _cast(h, x.W)
    cross = c * x.W - c1 * z.W
    bar_h = z.bar_H - x.bar_H - 0.5 * cross
    if x.bar_K is None:
        return Levy(h - h1, w, bar_h, None)
    assert z.bar_K is not None
    c2 = c - c1
    bar_k = (
        z.bar_K
        - x.bar_K
        - (c2 / 2) * x.bar_H
        + (c1 / 2) * bar_h
        - ((c2 - c1) / 12) * cross
    )
    return Levy(h - h1, w, bar_h, bar_k)


def scale(x: Levy, factor: Real[Array, ""]) -> Levy:
    """Brownian scaling: the increment of $W(\\text{factor}\\cdot t)$, in law."""
    root = _cast(jnp.sqrt(factor), x.W)
    f = _cast(factor, x.W)
    return Levy(
        dt=x.dt * jnp.astype(factor, x.dt.dtype),
        W=root * x.W,
        bar_H=None if x.bar_H is None else (f * root) * x.bar_H,
        bar_K=None if x.bar_K is None else (f * f * root) * x.bar_K,
    )


def _normals(key: PRNGKeyArray, levy_area: LevyAreaType, shape, dtype) -> list[Array]:
    n = num_normals(levy_area)
    z = jr.normal(key, (n, *shape), dtype)
    return [z[i] for i in range(n)]


def sample(
    key: PRNGKeyArray,
    levy_area: LevyAreaType,
    shape: tuple[int, ...],
    dtype,
    time_dtype,
) -> Levy:
    """An increment over an interval of length one: one normal draw."""
    z = _normals(key, levy_area, shape, dtype)
    one = jnp.ones((), time_dtype)
    bar_h = None if len(z) < 2 else z[1] / math.sqrt(12)
    bar_k = None if len(z) < 3 else z[2] / math.sqrt(720)
    return Levy(one, z[0], bar_h, bar_k)


def bridge(
    key: PRNGKeyArray, node: Levy, sr: Real[Array, ""], levy_area: LevyAreaType
) -> Levy:
    """Samples the increment over $[s, r]$ given the increment `node` over $[s, u]$,
    from its exact conditional law; `sr` is $r - s$, in $[0, u - s]$.

    One normal draw. At `sr == 0` and `sr == u - s` the noise has zero variance, so
    the result is exactly the empty increment and `node` respectively.
    """
    time_dtype = node.dt.dtype
    su = node.dt
    sr = jnp.clip(jnp.astype(sr, time_dtype), 0, su)
    # su == sr + ru exactly, whatever the cancellation in su - sr.
    ru = jnp.maximum(su - sr, 0)
    z = _normals(key, levy_area, node.W.shape, node.W.dtype)

    def c(x):
        return _cast(x, node.W)

    if levy_area is BrownianIncrement:
        w = c(sr / su) * node.W + c(jnp.sqrt(sr * ru / su)) * z[0]
        return Levy(sr, w, None, None)

    assert node.bar_H is not None
    if levy_area is SpaceTimeLevyArea:
        sr3, ru3, su3 = sr**3, ru**3, su**3
        d = jnp.sqrt(sr3 + ru3)
        d_prime = 1 / (2 * su * d)
        root = jnp.sqrt(sr * ru)
        a = d_prime * sr3 * root
        b = d_prime * ru3 * root
        e = jnp.sqrt(3 * sr3 * ru3) / (6 * d)
        w = (
            c(sr / su) * node.W
            + c(6 * sr * ru / su3) * node.bar_H
            + c(2 * (a + b) / su) * z[0]
        )
        bar_h = c(sr3 / su3) * node.bar_H - c(a) * z[0] + c(e) * z[1]
        return Levy(sr, w, bar_h, None)

    assert levy_area is SpaceTimeTimeLevyArea
    assert node.bar_K is not None
    p = sr / su
    q = ru / su
    pq = p * q
    sr2, ru2, su2 = sr**2, ru**2, su**2
    w_mean = c(p) * node.W + c(6 * pq / su) * node.bar_H
    w_mean = w_mean + c(120 * pq * (0.5 - p) / su2) * node.bar_K
    h_mean = c(p**2 / su) * (node.bar_H + c(30 * q / su) * node.bar_K)
    k_mean = c(p**3 / su2) * node.bar_K
    ww = p * q * ((sr - ru) ** 4 + 4 * sr2 * ru2) / su**3
    wh = -(p**3 * q * (sr2 - 3 * sr * ru + 6 * ru2)) / (2 * su)
    wk = p**4 * q * (sr - ru) / 12
    hh = (sr / 12) * (1 - p**3 * (sr2 + 2 * sr * ru + 16 * ru2) / su2)
    hk = -(ru / 24) * p**5
    kk = (sr / 720) * (1 - p**5)
    cov = jnp.stack(
        [jnp.stack([ww, wh, wk]), jnp.stack([wh, hh, hk]), jnp.stack([wk, hk, kk])]
    )
    # A symmetric square root rather than a Cholesky factor: the covariance is
    # singular at the ends of the interval.
    if jnp.dtype(time_dtype).itemsize < 4:
        cov = jnp.astype(cov, jnp.float32)
    evals, evecs = jnp.linalg.eigh(cov)
    root = evecs * jnp.sqrt(jnp.maximum(evals, 0))[None, :]
    hat = [sum(c(root[i, j]) * z[j] for j in range(3)) for i in range(3)]
    w = w_mean + hat[0]
    bar_h = c(sr) * (h_mean + hat[1])
    bar_k = c(sr2) * (k_mean + hat[2])
    return Levy(sr, w, bar_h, bar_k)


def to_increment(
    x: Levy, levy_area: LevyAreaType
) -> BrownianIncrement | SpaceTimeLevyArea | SpaceTimeTimeLevyArea:
    """The diffrax increment type, dividing out the rescaling of the Lévy areas."""
    dt = jnp.astype(x.dt, real_dtype(x.W.dtype))
    if levy_area is BrownianIncrement:
        return BrownianIncrement(dt=dt, W=x.W)
    tiny = jnp.abs(dt) < jnp.finfo(dt.dtype).eps
    inverse = _cast(1 / jnp.where(tiny, jnp.inf, dt), x.W)
    assert x.bar_H is not None
    h = inverse * x.bar_H
    if levy_area is SpaceTimeLevyArea:
        return SpaceTimeLevyArea(dt=dt, W=x.W, H=h)
    assert x.bar_K is not None
    return SpaceTimeTimeLevyArea(dt=dt, W=x.W, H=h, K=inverse**2 * x.bar_K)
