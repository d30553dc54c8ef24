"""Brownian increments with Lévy areas in standardised form: Chen's relation, time
reversal and the exact Brownian bridge.

An increment over an interval of length $h$ is held as $(w, \\hat{h}, \\hat{k}) =
(W, H, K) / \\sqrt{h}$, where $H$ and $K$ are the space-time and space-time-time Lévy
areas (Foster's thesis, Definition 4.2.1). Each of these is of order one whatever $h$
is: an increment over $h$ is the increment over $[0, 1]$ of a Brownian motion run on
its own clock. In this form Chen's relation and the bridge have coefficients that
are polynomials in the *fractions* $h_1/h$ and $h_2/h$ (and their square roots), so no
intermediate quantity under- or overflows, in float16 as in float64, however short
or long the interval; the length enters once, as $\\sqrt{h}$, when the increment is
returned.

The formulas are those of `diffrax.VirtualBrownianTree` (Foster's thesis, Theorem
6.1.4, and Jelinčič, Foster and Kidger 2024, Theorem 3.7) written for an interval of
unit length and divided through by the square root of the child's length.
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
from jaxtyping import Array, Bool, Inexact, PRNGKeyArray, Real


LevyAreaType = type[BrownianIncrement | SpaceTimeLevyArea | SpaceTimeTimeLevyArea]
_NUM_NORMALS = {BrownianIncrement: 1, SpaceTimeLevyArea: 2, SpaceTimeTimeLevyArea: 3}
_SQRT3 = math.sqrt(3)


class Levy(eqx.Module):
    """The standardised increment $(W, H, K) / \\sqrt{h}$ of one PyTree leaf of
    Brownian motion over an interval of length $h$ (kept elsewhere: it is shared by
    the leaves).

    `hh` is `None` unless space-time Lévy area is configured, and `kk` is `None`
    unless space-time-time Lévy area is.
    """

    w: Inexact[Array, " *shape"]
    hh: Inexact[Array, " *shape"] | None
    kk: Inexact[Array, " *shape"] | None


def real_dtype(dtype) -> jnp.dtype:
    """The real dtype matching `dtype` (float32 for complex64, and so on)."""
    return jnp.finfo(dtype).dtype


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype a leaf of `dtype` is sampled and combined in: at least single
    precision, so that float16 and bfloat16 paths are rounded once, on the way out."""
    dtype = jnp.dtype(dtype)
    if jnp.finfo(dtype).bits < 32:
        return jnp.dtype(jnp.float32)
    return dtype


def num_normals(levy_area: LevyAreaType) -> int:
    """Standard normals per array element that one increment or one bridge needs."""
    return _NUM_NORMALS[levy_area]


def _c(x, like: Array) -> Array:
    # A real coefficient in the leaf's own dtype (complex included), so that it
    # multiplies the leaf without implicit promotion.
    return jnp.astype(x, like.dtype)


def _map(f, *xs: Levy) -> Levy:
    """`f` applied to each of (w, hh, kk) of the `xs`, `None` kept."""
    x0 = xs[0]
    return Levy(
        w=f(*[x.w for x in xs]),
        hh=None if x0.hh is None else f(*[x.hh for x in xs]),
        kk=None if x0.kk is None else f(*[x.kk for x in xs]),
    )


def where(pred: Bool[Array, ""], x: Levy, y: Levy) -> Levy:
    return _map(lambda a, b: jnp.where(pred, a, b), x, y)


def zeros(struct, levy_area: LevyAreaType) -> Levy:
    """The (standardised) increment over an empty interval, for a leaf of `shape`."""
    n = num_normals(levy_area)
    z = jnp.zeros(struct.shape, compute_dtype(struct.dtype))
    return Levy(w=z, hh=z if n >= 2 else None, kk=z if n >= 3 else None)


def zero_like(x: Levy) -> Levy:
    return _map(jnp.zeros_like, x)


def _normals(key: PRNGKeyArray, n: int, shape, dtype) -> list[Array]:
    z = jr.normal(key, (n, *shape), dtype)
    return [z[i] for i in range(n)]


def sample(key: PRNGKeyArray, levy_area: LevyAreaType, struct) -> Levy:
    """A fresh increment (over any length: the form is standardised): one draw."""
    z = _normals(key, num_normals(levy_area), struct.shape, compute_dtype(struct.dtype))
    return Levy(
        w=z[0],
        hh=None if len(z) < 2 else z[1] * (1 / math.sqrt(12)),
        kk=None if len(z) < 3 else z[2] * (1 / math.sqrt(720)),
    )


def reverse(x: Levy) -> Levy:
    """The increment of the same interval run backwards in time: $W$ and $K$ change
    sign, $H$ does not."""
    return Levy(
        w=-x.w,
        hh=x.hh,
        kk=None if x.kk is None else -x.kk,
    )


def fractions(
    h1: Real[Array, ""], h2: Real[Array, ""]
) -> tuple[Real[Array, ""], Real[Array, ""]]:
    """$h_1 / (h_1 + h_2)$ and $h_2 / (h_1 + h_2)$; (0, 0) for two empty intervals."""
    h = h1 + h2
    safe = jnp.where(h > 0, h, 1)
    return h1 / safe, h2 / safe


def concatenate(x: Levy, y: Levy, a: Real[Array, ""], b: Real[Array, ""]) -> Levy:
    """Chen's relation: the increment over $[s, u]$ from those over $[s, t]$ (`x`)
    and $[t, u]$ (`y`), where `a` and `b` are the fractions $(t - s)/(u - s)$ and
    $(u - t)/(u - s)$."""
    sa, sb = jnp.sqrt(a), jnp.sqrt(b)
    w = _c(sa, x.w) * x.w + _c(sb, x.w) * y.w
    if x.hh is None:
        return Levy(w, None, None)
    assert y.hh is not None
    # (h2 W1 - h1 W2) / h^{3/2}
    cross = _c(b * sa, x.w) * x.w - _c(a * sb, x.w) * y.w
    a3, b3 = a * sa, b * sb
    hh = _c(a3, x.w) * x.hh + _c(b3, x.w) * y.hh + 0.5 * cross
    if x.kk is None:
        return Levy(w, hh, None)
    assert y.kk is not None
    kk = (
        _c(a * a3, x.w) * x.kk
        + _c(b * b3, x.w) * y.kk
        + _c(b * a3 / 2, x.w) * x.hh
        - _c(a * b3 / 2, x.w) * y.hh
        + _c((b - a) / 12, x.w) * cross
    )
    return Levy(w, hh, kk)


def remove_left(x: Levy, z: Levy, a: Real[Array, ""], b: Real[Array, ""]) -> Levy:
    """The inverse of `concatenate`: the increment over $[t, u]$ from those over
    $[s, t]$ (`x`) and $[s, u]$ (`z`), with `a` and `b` as there.

    Well conditioned when `b` is not small; callers arrange that it is at least 1/2,
    except inside one leaf of the tree."""
    sa, sb = jnp.sqrt(a), jnp.sqrt(b)
    inv_sb = 1 / jnp.where(b > 0, sb, 1)
    w = _c(inv_sb, z.w) * (z.w - _c(sa, z.w) * x.w)
    if x.hh is None:
        return Levy(w, None, None)
    assert z.hh is not None
    cross = _c(b * sa, z.w) * x.w - _c(a * sb, z.w) * w
    a3, b3 = a * sa, b * sb
    hh = _c(inv_sb / jnp.where(b > 0, b, 1), z.w) * (
        z.hh - _c(a3, z.w) * x.hh - 0.5 * cross
    )
    if x.kk is None:
        return Levy(w, hh, None)
    assert z.kk is not None
    b5 = b * b3
    kk = _c(1 / jnp.where(b > 0, b5, 1), z.w) * (
        z.kk
        - _c(a * a3, z.w) * x.kk
        - _c(b * a3 / 2, z.w) * x.hh
        + _c(a * b3 / 2, z.w) * hh
        - _c((b - a) / 12, z.w) * cross
    )
    return Levy(w, hh, kk)


def remove_right(z: Levy, y: Levy, a: Real[Array, ""], b: Real[Array, ""]) -> Levy:
    """The increment over $[s, t]$ from those over $[s, u]$ (`z`) and $[t, u]$
    (`y`), with `a` and `b` as for `concatenate`: `remove_left` in reversed time."""
    return reverse(remove_left(reverse(y), reverse(z), b, a))


def _bridge(
    key: PRNGKeyArray,
    node: Levy,
    p: Real[Array, ""],
    q: Real[Array, ""],
    levy_area: LevyAreaType,
) -> Levy:
    """Samples the increment over $[0, p]$ given the increment `node` over $[0, 1]$
    ($q = 1 - p$, passed separately so that neither is rounded), from its exact
    conditional law; requires $p \\le 1/2$."""
    z = _normals(key, num_normals(levy_area), node.w.shape, node.w.dtype)
    sp, sq = jnp.sqrt(p), jnp.sqrt(q)

    def c(x):
        return _c(x, node.w)

    if levy_area is BrownianIncrement:
        return Levy(c(sp) * node.w + c(sq) * z[0], None, None)

    assert node.hh is not None
    if levy_area is SpaceTimeLevyArea:
        # Foster's thesis, Theorem 6.1.4, on [0, 1] and divided by sqrt(p).
        p3, q3 = p**3, q**3
        d = jnp.sqrt(p3 + q3)
        w = c(sp) * node.w + c(6 * sp * q) * node.hh + c(sq * d) * z[0]
        hh = (
            c(p * sp) * node.hh
            - c(p * p * sq / (2 * d)) * z[0]
            + c(q * sq / (2 * _SQRT3 * d)) * z[1]
        )
        return Levy(w, hh, None)

    assert levy_area is SpaceTimeTimeLevyArea
    assert node.kk is not None
    # Jelinčič, Foster and Kidger 2024, Theorem 3.7, on [0, 1] and divided by
    # sqrt(p): the mean, and the covariance divided by p.
    w = c(sp) * node.w + c(6 * sp * q) * node.hh + c(120 * sp * q * (0.5 - p)) * node.kk
    hh = c(p * sp) * (node.hh + c(30 * q) * node.kk)
    kk = c(p * p * sp) * node.kk
    pq = p - q
    ww = q * (pq**4 + 4 * p * p * q * q)
    wh = -(p * p * q * (p * p - 3 * p * q + 6 * q * q)) / 2
    wk = p**3 * q * pq / 12
    h2 = (1 - p**3 * (p * p + 2 * p * q + 16 * q * q)) / 12
    hk = -(q * p**4) / 24
    k2 = (1 - p**5) / 720
    # For p <= 1/2 this covariance is positive definite and well conditioned (its
    # smallest eigenvalue is at least 4.9e-4, at p = 1/2): a closed-form Cholesky
    # factor, elementwise arithmetic only.
    l00 = jnp.sqrt(ww)
    l10 = wh / l00
    l20 = wk / l00
    l11 = jnp.sqrt(h2 - l10 * l10)
    l21 = (hk - l20 * l10) / l11
    l22 = jnp.sqrt(jnp.maximum(k2 - l20 * l20 - l21 * l21, 0))
    w = w + c(l00) * z[0]
    hh = hh + c(l10) * z[0] + c(l11) * z[1]
    kk = kk + c(l20) * z[0] + c(l21) * z[1] + c(l22) * z[2]
    return Levy(w, hh, kk)


def split(
    key: PRNGKeyArray,
    node: Levy,
    p: Real[Array, ""],
    q: Real[Array, ""],
    levy_area: LevyAreaType,
) -> tuple[Levy, Levy]:
    """Splits the increment `node` over an interval into those over its first
    fraction `p` and its last fraction `q` (with $p + q = 1$; both are passed, so
    that the smaller is exact), from their exact joint conditional law. One normal
    draw.

    The smaller part is bridged and the larger found by Chen's relation, so that
    nothing is lost to cancellation however close the split is to an end: when the
    right part is the smaller, the bridge runs in reversed time.
    """
    left_small = p <= q
    small, large = jnp.where(left_small, p, q), jnp.where(left_small, q, p)
    oriented = where(left_small, node, reverse(node))
    part = _bridge(key, oriented, small, large, levy_area)
    rest = remove_left(part, oriented, small, large)
    left = where(left_small, part, reverse(rest))
    right = where(left_small, rest, reverse(part))
    return left, right
