"""`BrownianInterval`: laws, consistency and use inside `diffeqsolve`.

The statistical tests use fixed seeds, so they are deterministic. Each compares a
sample of 20,000 draws with its exact law: a Kolmogorov–Smirnov p-value above
`KS_P = 1e-4` per column, and sample means, variances and correlations within 5
standard errors of 0, 1 and 0.
(A correct sampler fails a given check with probability about 1e-4, and the seeds
are fixed, so a failure means a wrong law, not bad luck.)
"""

import functools as ft
from typing import Any, cast

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import scipy.stats

import diffrax_extras as dxe

from .helpers import backprop


T0, T1, DT, TOL = 0.0, 1.0, 0.1, 2**-8
LEVY_AREAS = [dfx.BrownianIncrement, dfx.SpaceTimeLevyArea, dfx.SpaceTimeTimeLevyArea]
NUM_SAMPLES = 20_000
KS_P = 1e-4
# Disjoint intervals covering [0.13, 1]: whole pieces, parts of one piece, parts
# spanning several pieces, nested inside the tree at different depths.
PARTITION = [
    (0.13, 0.15),
    (0.15, 0.171),
    (0.171, 0.29),
    (0.29, 0.3),
    (0.3, 0.4),
    (0.4, 0.95),
    (0.95, 1.0),
]


def _path(
    key,
    levy_area: type[
        dfx.BrownianIncrement | dfx.SpaceTimeLevyArea | dfx.SpaceTimeTimeLevyArea
    ] = dfx.BrownianIncrement,
    dt=DT,
    shape=(),
    tol=TOL,
):
    return dxe.BrownianInterval(T0, T1, tol, shape, key, levy_area=levy_area, dt=dt)


# Inside one piece, for the bridge law.
BRIDGE = [(0.213, 0.2571), (0.213, 0.2932)]
QUERIES = [*PARTITION, (T0, T1), (0.37, 0.05), *BRIDGE]


@ft.cache
def _samples(levy_area) -> dict:
    """Samples of the increments over `QUERIES`, one row per key."""
    starts, ends = (jnp.array(x) for x in zip(*QUERIES, strict=True))

    @jax.jit
    @jax.vmap
    def sample(key):
        # One trace of `evaluate`, vmapped over the queries too.
        bm = _path(key, levy_area)
        return jax.vmap(ft.partial(bm.evaluate, use_levy=True))(starts, ends)

    out = sample(jr.split(jr.PRNGKey(0), NUM_SAMPLES))
    return {
        q: jax.tree.map(ft.partial(lambda i, x: x[:, i], i), out)
        for i, q in enumerate(QUERIES)
    }


def _standardised(increment) -> list[np.ndarray]:
    """W, H and K divided by their standard deviations: independent N(0, 1)."""
    h = np.abs(np.asarray(increment.dt))
    out = [np.asarray(increment.W) / np.sqrt(h)]
    if isinstance(increment, dfx.AbstractSpaceTimeLevyArea):
        out.append(np.asarray(increment.H) / np.sqrt(h / 12))
    if isinstance(increment, dfx.AbstractSpaceTimeTimeLevyArea):
        out.append(np.asarray(increment.K) / np.sqrt(h / 720))
    return out


def _assert_iid_standard_normal(samples: list[np.ndarray]):
    columns = np.stack(samples, axis=-1)
    for j in range(columns.shape[-1]):
        assert scipy.stats.kstest(columns[:, j], "norm").pvalue > KS_P, j
    # KS is weak against a wrong scale: mean and variance to 5 standard errors.
    num = columns.shape[0]
    assert np.all(np.abs(columns.mean(axis=0)) < 5 / np.sqrt(num))
    assert np.all(np.abs(columns.var(axis=0) - 1) < 5 * np.sqrt(2 / num))
    corr = np.atleast_2d(np.corrcoef(columns, rowvar=False))
    off_diagonal = corr - np.eye(corr.shape[0])
    assert np.max(np.abs(off_diagonal)) < 5 / np.sqrt(num)


@pytest.mark.parametrize("levy_area", LEVY_AREAS)
def test_disjoint_increments_are_independent_with_exact_law(levy_area):
    # Over disjoint intervals, (W, H, K) are independent with W ~ N(0, h),
    # H ~ N(0, h/12), K ~ N(0, h/720): the marginal and joint laws at once.
    samples = _samples(levy_area)
    _assert_iid_standard_normal(
        [c for q in PARTITION for c in _standardised(samples[q])]
    )


@pytest.mark.parametrize("levy_area", LEVY_AREAS)
def test_whole_and_reversed_intervals_have_exact_law(levy_area):
    samples = _samples(levy_area)
    whole, backwards = samples[(T0, T1)], samples[(0.37, 0.05)]
    _assert_iid_standard_normal(_standardised(whole))
    _assert_iid_standard_normal(_standardised(backwards))


def test_bridge_law_given_enclosing_interval():
    # W over [a, b] given W over [a, c] is N((b - a)/(c - a) W_ac, (b-a)(c-b)/(c-a)),
    # with a, b, c inside one piece, so that the tree's bridges produce it.
    (a, b), (_, c) = BRIDGE
    samples = _samples(dfx.BrownianIncrement)
    part, enclosing = samples[(a, b)], samples[(a, c)]
    w_ab, w_ac = np.asarray(part.W), np.asarray(enclosing.W)
    residual = w_ab - (b - a) / (c - a) * w_ac
    std = np.sqrt((b - a) * (c - b) / (c - a))
    _assert_iid_standard_normal([residual / std, w_ac / np.sqrt(c - a)])


def test_joint_law_at_random_points():
    # W at points in different leaves has covariance min(t_i, t_j); whitening by its
    # Cholesky factor must give independent N(0, 1).
    points = np.sort(np.random.default_rng(1).uniform(T0, T1, 6))

    @jax.jit
    def sample(keys):
        def at_points(key) -> jax.Array:
            return jnp.stack([cast(jax.Array, _path(key).evaluate(t)) for t in points])

        return jax.vmap(at_points)(keys)

    values = np.asarray(sample(jr.split(jr.PRNGKey(1), NUM_SAMPLES)))
    chol = np.linalg.cholesky(np.minimum(points[:, None], points[None, :]))
    white = np.linalg.solve(chol, values.T).T
    _assert_iid_standard_normal(list(white.T))


def _from_definition(parts):
    """W, H and K over the union of consecutive `parts` (lists of (h, W, H, K)),
    computed from the integrals that define the Lévy areas, not from Chen's relation.

    With g = ∫ W(a, r) dr = h (H + W/2) and m = ∫ W(a, r)(r - a) dr
    = (h/2) g + h² W/12 - h² K over each part (Foster's thesis, Definition 4.2.1).
    """
    start, w, g_total, m_total = 0.0, 0.0, 0.0, 0.0
    for h, w_i, h_i, k_i in parts:
        g_i = h * (h_i + w_i / 2)
        m_i = (h / 2) * g_i + h**2 * w_i / 12 - h**2 * k_i
        g_total = g_total + w * h + g_i
        m_total = m_total + w * (start * h + h**2 / 2) + start * g_i + m_i
        start, w = start + h, w + w_i
    big_h = g_total / start - w / 2
    big_k = ((start / 2) * g_total + start**2 * w / 12 - m_total) / start**2
    return w, big_h, big_k


def test_additive_and_chen_relation_over_random_partitions():
    rng = np.random.default_rng(2)
    bm = _path(jr.PRNGKey(3), dfx.SpaceTimeTimeLevyArea, shape=(4,))
    for _ in range(3):
        inner = rng.uniform(T0, T1, 12)
        # Some cuts exactly on piece boundaries, some in the same leaf.
        inner[:3] = [0.3, 0.6, 0.6 + 1e-4]
        cuts = np.concatenate([[T0], np.sort(inner), [T1]])
        # Array times: `evaluate` is `eqx.filter_jit`-ed, and would compile again
        # for every distinct Python float.
        parts = [
            bm.evaluate(jnp.array(s), jnp.array(t), use_levy=True)
            for s, t in zip(cuts[:-1], cuts[1:], strict=True)
        ]
        whole = bm.evaluate(T0, T1, use_levy=True)
        assert isinstance(whole, dfx.SpaceTimeTimeLevyArea)
        areas = [p for p in parts if isinstance(p, dfx.SpaceTimeTimeLevyArea)]
        assert len(areas) == len(parts)
        w, h, k = _from_definition([(p.dt, p.W, p.H, p.K) for p in areas])
        np.testing.assert_allclose(w, whole.W, rtol=0, atol=1e-13)
        np.testing.assert_allclose(h, whole.H, rtol=0, atol=1e-12)
        np.testing.assert_allclose(k, whole.K, rtol=0, atol=1e-12)


def _stack(inc) -> jax.Array:
    return jnp.stack([inc.W, inc.H, inc.K])


# Queries for the consistency tests: a piece, reversed, the whole interval, an empty
# one, one inside a leaf, one across pieces and random ones.
_CONSISTENCY = [
    (0.2, 0.3),
    (0.3, 0.2),
    (0.0, 1.0),
    (0.15, 0.15),
    (0.05, 0.0501),
    (0.13, 0.47),
    *[tuple(x) for x in np.random.default_rng(4).uniform(T0, T1, (6, 2))],
]


def test_bitwise_consistent_under_reordering_reversal_and_repetition():
    rng = np.random.default_rng(4)
    starts = rng.uniform(T0, T1, 40)
    ends = np.clip(starts + rng.uniform(-0.3, 0.3, 40), T0, T1)
    starts[: len(_CONSISTENCY)], ends[: len(_CONSISTENCY)] = zip(
        *_CONSISTENCY, strict=True
    )
    bm = _path(jr.PRNGKey(5), dfx.SpaceTimeTimeLevyArea, shape=(3,))

    @eqx.filter_jit
    def query(bm, s, t):
        return _stack(bm.evaluate(s, t, use_levy=True))

    @eqx.filter_jit
    def scanned(bm, starts, ends):
        return jax.lax.scan(lambda c, st: (c, query(bm, *st)), None, (starts, ends))[1]

    one_by_one = np.stack(
        [
            query(bm, jnp.array(s), jnp.array(t))
            for s, t in zip(starts, ends, strict=True)
        ]
    )
    order = rng.permutation(40)
    permuted = np.asarray(scanned(bm, starts[order], ends[order]))
    twice = np.concatenate([starts[order], starts[order[:7]]])
    repeated = np.asarray(
        scanned(bm, twice, np.concatenate([ends[order], ends[order[:7]]]))
    )
    backwards = np.asarray(scanned(bm, ends, starts))
    np.testing.assert_array_equal(permuted[np.argsort(order)], one_by_one)
    np.testing.assert_array_equal(repeated[:40], permuted)
    np.testing.assert_array_equal(repeated[40:], permuted[:7])
    # Backwards in time: W and K change sign, H does not (as VirtualBrownianTree).
    np.testing.assert_array_equal(
        backwards, one_by_one * np.array([-1, 1, -1])[:, None]
    )
    assert np.all(one_by_one[3] == 0)


def test_reversed_queries_follow_virtual_brownian_tree():
    # The convention checked on VirtualBrownianTree itself, not assumed: running an
    # interval backwards negates dt, W and K and keeps H.
    s, t = jnp.array(0.17), jnp.array(0.71)
    tree = dfx.VirtualBrownianTree(
        T0, T1, TOL, (4,), jr.PRNGKey(0), levy_area=dfx.SpaceTimeTimeLevyArea
    )
    interval = _path(jr.PRNGKey(0), dfx.SpaceTimeTimeLevyArea, shape=(4,))
    for bm in (tree, interval):
        forward = bm.evaluate(s, t, use_levy=True)
        backward = bm.evaluate(t, s, use_levy=True)
        signs = [-1, -1, 1, -1]
        for sign, name in zip(signs, ["dt", "W", "H", "K"], strict=True):
            # VirtualBrownianTree takes both directions from its values at s and t
            # (of order one on [0, 1]), in the other order: equal to their rounding.
            np.testing.assert_allclose(
                getattr(backward, name),
                sign * getattr(forward, name),
                rtol=0,
                atol=1e-14,
            )
            assert np.all(np.abs(np.asarray(getattr(forward, name))) > 0)


# A path that a jitted function closes over, as user code usually has it: its times
# are compile-time constants there.
# (Of the structure of the path in the Chen's relation test, so that eager queries
# reuse its compilation of `evaluate`.)
_CLOSED_OVER = _path(jr.PRNGKey(5), dfx.SpaceTimeTimeLevyArea, shape=(4,))


@jax.jit
def _closed_over(s, t):
    return _stack(_CLOSED_OVER.evaluate(s, t, use_levy=True))


# A query inside one leaf and one across pieces: each is compiled as its own
# copy in a program where it is constant.
_CONSTANT = [_CONSISTENCY[i] for i in (4, 5)]


@jax.jit
def _constant_times(key):
    # Arrays made inside the trace from Python floats are constants in the program
    # (as Python floats passed to `evaluate` itself are, being static there);
    # so are the times of the closed-over path, and of one built inside from them.
    inside = _path(key, dfx.SpaceTimeTimeLevyArea, shape=(4,))
    return [
        jnp.stack(
            [
                _stack(bm.evaluate(jnp.array(s), jnp.array(t), use_levy=True))
                for s, t in queries
            ]
        )
        for bm, queries in [(_CLOSED_OVER, _CONSTANT), (inside, _CONSTANT[1:])]
    ]


def test_bitwise_the_same_traced_closed_over_constant_and_eager():
    # Reference: `evaluate` called eagerly with array times, so that the path and
    # the times are traced arguments of its `filter_jit`.
    bm = _CLOSED_OVER
    reference = np.stack(
        [
            _stack(bm.evaluate(jnp.array(s), jnp.array(t), use_levy=True))
            for s, t in _CONSISTENCY
        ]
    )
    assert np.all(reference[[0, 2, 4, 5]] != 0)
    closed = np.stack(
        [_closed_over(jnp.array(s), jnp.array(t)) for s, t in _CONSISTENCY]
    )
    np.testing.assert_array_equal(closed, reference)
    closed_constant, inside_constant = _constant_times(jr.PRNGKey(5))
    np.testing.assert_array_equal(closed_constant, reference[[4, 5]])
    np.testing.assert_array_equal(inside_constant, reference[[5]])
    # Python floats are static arguments of `evaluate`'s `filter_jit`: constants,
    # compiled once per value, so only one here.
    s, t = _CONSISTENCY[5]
    np.testing.assert_array_equal(
        _stack(bm.evaluate(float(s), float(t), use_levy=True)), reference[5]
    )


def test_vmapped_queries_bitwise_across_the_batch_and_to_rounding_unbatched():
    bm = _CLOSED_OVER
    starts, ends = (np.array(x) for x in zip(*_CONSISTENCY, strict=True))
    batched = eqx.filter_jit(
        jax.vmap(
            lambda bm, s, t: _stack(bm.evaluate(s, t, use_levy=True)),
            in_axes=(None, 0, 0),
        )
    )
    out = np.asarray(batched(bm, starts, ends))
    # Reordered, repeated within one batch, and a second call: the same bits, in
    # whichever position of the batch a query sits.
    order = np.random.default_rng(6).permutation(len(starts))
    twice = np.asarray(
        batched(
            bm,
            np.concatenate([starts[order], starts]),
            np.concatenate([ends[order], ends]),
        )
    )
    np.testing.assert_array_equal(twice[: len(order)], out[order])
    np.testing.assert_array_equal(twice[len(order) :], out)
    # Against the unbatched query: XLA's CPU compiler contracts a * x + b * y into
    # a fused multiply-add on either product, and chooses differently in the
    # batched and the unbatched program (VirtualBrownianTree's values move alike),
    # so here to rounding: measured at most 1.2 eps of each quantity's largest
    # value, over 100 random queries of each Lévy area in float32 and float64.
    unbatched = np.stack(
        [_closed_over(s, t) for s, t in zip(starts, ends, strict=True)]
    )
    scale = np.max(np.abs(unbatched), axis=(0, 2), keepdims=True)
    assert np.all(np.abs(out - unbatched) <= 8 * np.finfo(np.float64).eps * scale)


def test_piece_boundaries_absorb_their_own_rounding_only():
    # (Of the structure of `_CLOSED_OVER`, whose compilation it reuses.)
    bm = _path(jr.PRNGKey(6), dfx.SpaceTimeTimeLevyArea, shape=(4,))

    def evaluate(bm, s, t):
        dtype = bm.t0.dtype
        inc = bm.evaluate(jnp.array(s, dtype), jnp.array(t, dtype), use_levy=True)
        return np.asarray(_stack(inc))

    def nudge(t, ulps, dtype: Any = np.float64):
        t = dtype(t)
        return t if t == 0 else t + dtype(ulps) * np.spacing(t)

    for s, t in [(0.3, 0.4), (T0, 0.1), (0.9, T1), (0.2, 0.7), (T0, T1)]:
        exact = evaluate(bm, s, t)
        for ds, de in [(-2, 3), (1, -1), (3, 2)]:
            near = evaluate(bm, max(nudge(s, ds), T0), min(nudge(t, de), T1))
            np.testing.assert_array_equal(near, exact)
        # Sixteen ULPs of the boundary is a genuine (short) part of a piece.
        if s != 0:
            assert np.all(evaluate(bm, nudge(s, 16), t) != exact)
    # 0.1 * 3 != 0.3 in floating point: the boundary is found either way.
    np.testing.assert_array_equal(
        evaluate(bm, 3 * 0.1, 4 * 0.1), evaluate(bm, 0.3, 0.4)
    )

    # Far from t = 0 the rounding is that of the boundary, not of the largest time:
    # near t = 0 on [0, 1000], float32 resolves times of 1e-10. (Snapping by 8 ULPs
    # of 1000 made all of these exactly 0.)
    f32 = np.float32
    long = dxe.BrownianInterval(
        jnp.float32(0),
        jnp.float32(1000),
        jnp.float32(1e-4),
        (4,),
        jr.PRNGKey(7),
        levy_area=dfx.SpaceTimeTimeLevyArea,
        dt=jnp.float32(0.01),
    )
    for s, t in [(0.0002, 0.0008), (0.0, 0.0008), (0.0102, 0.0109), (0.01, 0.0100001)]:
        assert np.all(evaluate(long, s, t) != 0), (s, t)
    for b in [f32(0.01), f32(500.0), f32(999.98)]:
        exact = evaluate(long, b, b + f32(0.01))
        near = evaluate(long, nudge(b, -3, f32), nudge(b + f32(0.01), 2, f32))
        np.testing.assert_array_equal(near, exact)

    # The steps of `ConstantStepSize`, t0 + (t1 - t0) * (k / n), land on the pieces.
    num = 100_000
    k = np.arange(0, num, 37)
    steps = f32(1000) * ((k + 1).astype(f32) / f32(num))
    starts = f32(1000) * (k.astype(f32) / f32(num))
    batched = eqx.filter_jit(jax.vmap(lambda bm, s, t: bm.evaluate(s, t), (None, 0, 0)))
    boundaries = np.arange(num + 1).astype(f32) * f32(0.01)
    on_pieces = batched(long, boundaries[k], boundaries[k + 1])
    np.testing.assert_array_equal(batched(long, starts, steps), on_pieces)


def _representable(std: np.ndarray, dtype) -> np.ndarray:
    """Whether values of this standard deviation are held in `dtype` to a 256th of
    it or better, without overflow."""
    info = jnp.finfo(dtype)
    smallest = float(info.smallest_subnormal)
    return (std >= 256 * smallest) & (8 * std <= float(info.max))


# (t0, t1, dt, tol as a fraction of dt, queries): pieces from 1e-9 to 1, intervals
# from 1e-7 to 1e4, some far from t = 0; queries near t0, t1 and piece boundaries,
# inside one piece, across several, all longer than `tol` (the joint law inside one
# leaf of width `tol` is not exact, as for VirtualBrownianTree).
SCALES = {
    "pieces of 1e-9": (
        0.0,
        1e-7,
        1e-9,
        2**-2,
        [(0.0, 1e-9), (3e-9, 4e-9), (2.3e-8, 2.37e-8), (5.05e-8, 5.25e-8)],
    ),
    "pieces of 1e-8": (
        0.0,
        1e-6,
        1e-8,
        2**-1,
        [(3e-7, 3.1e-7), (3.01e-7, 3.07e-7), (0.0, 2e-9), (1e-6 - 5e-9, 1e-6)],
    ),
    "pieces of 5e-4": (
        0.0,
        1.0,
        5e-4,
        2**-1,
        [(0.5, 0.5005), (0.25, 0.2502), (0.0, 1e-4), (0.9999, 1.0), (0.33, 0.3304)],
    ),
    "pieces of 5e-3": (
        0.0,
        1.0,
        5e-3,
        2**-3,
        [(0.5, 0.505), (0.2501, 0.2522), (0.0, 0.0013), (0.998, 1.0), (0.4, 0.6)],
    ),
    "[0, 1000], pieces of 0.01": (
        0.0,
        1000.0,
        0.01,
        2**-7,
        [(0.0002, 0.0008), (0.0, 0.0008), (0.0102, 0.0109), (999.99, 1000.0)],
    ),
    "[0, 1e4], pieces of 1": (
        0.0,
        1e4,
        1.0,
        2**-10,
        [(5000.0, 5001.0), (4999.99, 5000.02), (1e4 - 0.3, 1e4), (1e-3, 3e-3)],
    ),
    "[1e4, 1e4 + 100]": (
        1e4,
        1e4 + 100,
        0.5,
        2**-2,
        [(1e4, 1e4 + 0.5), (1e4 + 50.25, 1e4 + 50.75), (1e4 + 10.0, 1e4 + 30.0)],
    ),
}


# Enough for KS to see a standard deviation off by 5%.
SCALE_SAMPLES = 10_000


@ft.cache
def _scale_sampler(dtype, tree: bool = False):
    """Samples (W, H, K) over one query for `SCALE_SAMPLES` scalar paths of `dtype`
    with float32 times (VirtualBrownianTree: W and H only). The times are arguments,
    so one compilation serves every query at every scale, and each query costs
    only its own descent of the tree."""

    @jax.jit
    def sample(t0, t1, dt, tol, s, t):
        def one(key):
            struct = jax.ShapeDtypeStruct((), dtype)
            if tree:
                levy_area = dfx.SpaceTimeLevyArea
                bm = dfx.VirtualBrownianTree(t0, t1, tol, struct, key, levy_area)
                inc = cast(dfx.SpaceTimeLevyArea, bm.evaluate(s, t, use_levy=True))
                return jnp.stack([inc.W, inc.H]).astype(jnp.float32)
            levy_area = dfx.SpaceTimeTimeLevyArea
            bm = dxe.BrownianInterval(
                t0, t1, tol, struct, key, levy_area=levy_area, dt=dt
            )
            return _stack(bm.evaluate(s, t, use_levy=True)).astype(jnp.float32)

        return jax.vmap(one)(jr.split(jr.PRNGKey(8), SCALE_SAMPLES))

    def run(config):
        """Standardised samples (sample, quantity, query), and the standard
        deviations (quantity, query) they were divided by."""
        t0, t1, dt, tol, queries = config
        f32 = np.float32
        times = [f32(x) for x in (t0, t1, dt, dt * tol)]
        out = np.stack(
            [np.asarray(sample(*times, f32(s), f32(t))) for s, t in queries], -1
        )
        # The exact law of the float32 query times (their difference is exact in
        # float64).
        h = np.array([np.float64(f32(t)) - np.float64(f32(s)) for s, t in queries])
        std = np.sqrt(h[None, :] / np.array([1, 12, 720])[: out.shape[1], None])
        return out.astype(np.float64) / std, std

    return run


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_exact_law_at_every_time_scale(dtype):
    # W ~ N(0, h), H ~ N(0, h/12), K ~ N(0, h/720), independent, for each query
    # (KS p-value above KS_P, moments to 5 standard errors), at every scale the
    # dtype can hold the answer at. float32 holds all; float16 does not hold K
    # below about h = 1e-7 (its standard deviation would be subnormal), nor W of a
    # step of 1e-9. (VirtualBrownianTree gives NaN for all of these in float16, and
    # in float32 loses K on steps shorter than about 1e-3 of its interval.)
    run = _scale_sampler(dtype)
    for name, config in SCALES.items():
        z, std = run(config)
        keep = _representable(std, dtype)
        assert dtype == jnp.float16 or np.all(keep)
        for j in range(z.shape[-1]):
            columns = [z[:, i, j] for i in range(3) if keep[i, j]]
            assert columns, name
            _assert_iid_standard_normal(columns)


def test_same_law_as_virtual_brownian_tree_where_it_is_right():
    # Two-sample KS against VirtualBrownianTree, in float32, on the queries where
    # VirtualBrownianTree itself has the exact law of W and H (checked here first);
    # its K is off in most of them (K of a short step is a small difference of
    # large numbers in its coordinates of the whole interval).
    ours, tree = _scale_sampler(jnp.float32), _scale_sampler(jnp.float32, tree=True)
    for name in ["pieces of 1e-8", "[1e4, 1e4 + 100]"]:
        z_ours, _ = ours(SCALES[name])
        z_tree, _ = tree(SCALES[name])
        for j in range(z_ours.shape[-1]):
            _assert_iid_standard_normal([z_tree[:, 0, j], z_tree[:, 1, j]])
            for i in range(2):
                result = scipy.stats.ks_2samp(z_ours[:, i, j], z_tree[:, i, j])
                pvalue = float(cast(Any, result).pvalue)
                assert pvalue > KS_P, (name, j, i)


def test_pytree_shape_and_dtypes():
    shape = {
        "a": jax.ShapeDtypeStruct((2, 3), jnp.float16),
        "b": (jax.ShapeDtypeStruct((4,), jnp.float32),),
        "c": jax.ShapeDtypeStruct((), jnp.complex64),
        "d": jax.ShapeDtypeStruct((5,), jnp.float64),
    }
    # Space-time-time Lévy area: every field; the per-leaf code is shared.
    for levy_area in [dfx.SpaceTimeTimeLevyArea]:
        bm = _path(jr.PRNGKey(7), levy_area, shape=shape)
        for s, t in [(0.1, 0.2), (0.13, 0.47)]:
            inc = bm.evaluate(jnp.array(s), jnp.array(t), use_levy=True)
            assert isinstance(inc, levy_area)
            for name in ("W", "H", "K"):
                if not hasattr(inc, name):
                    continue
                out = getattr(inc, name)
                assert jax.tree.structure(out) == jax.tree.structure(shape)
                leaves = zip(jax.tree.leaves(out), jax.tree.leaves(shape), strict=True)
                for x, struct in leaves:
                    assert x.shape == struct.shape and x.dtype == struct.dtype
                    assert np.all(np.isfinite(np.asarray(x)))


@pytest.mark.parametrize(
    "controller, dt0",
    [
        (dfx.ConstantStepSize(), DT),  # steps on the pieces
        (dfx.ConstantStepSize(), 0.037),  # steps off the pieces
        (dfx.StepTo(ts=np.linspace(T0, T1, 8) ** 2), None),
    ],
)
def test_solve_of_dW_reproduces_the_increment(controller, dt0):
    bm = _path(jr.PRNGKey(8), shape=(3,))
    terms = dfx.ControlTerm(lambda t, y, args: jnp.eye(3), bm)
    sol = dfx.diffeqsolve(
        terms,
        dfx.Euler(),
        T0,
        T1,
        dt0,
        jnp.zeros(3),
        stepsize_controller=controller,
    )
    assert sol.ys is not None
    whole = cast(jax.Array, bm.evaluate(T0, T1))
    np.testing.assert_allclose(sol.ys[-1], whole, rtol=0, atol=1e-13)


@pytest.mark.slow
def test_ornstein_uhlenbeck_moments_with_rejected_steps():
    theta, sigma, y0 = 2.0, 0.8, 1.5
    num = 4000

    @jax.jit
    @jax.vmap
    def solve(key):
        bm = _path(key, dt=0.02, shape=())
        terms = dfx.MultiTerm(
            dfx.ODETerm(lambda t, y, args: -theta * y),
            dfx.ControlTerm(lambda t, y, args: sigma, bm),
        )
        sol = dfx.diffeqsolve(
            terms,
            dfx.Heun(),
            T0,
            T1,
            0.1,
            jnp.array(y0),
            stepsize_controller=dfx.PIDController(rtol=1e-3, atol=1e-3, dtmin=1e-4),
            saveat=dfx.SaveAt(t1=True),
            max_steps=4096,
        )
        assert sol.ys is not None
        return sol.ys[-1], sol.stats["num_rejected_steps"]

    ys, rejected = solve(jr.split(jr.PRNGKey(9), num))
    ys = np.asarray(ys)
    assert np.all(np.asarray(rejected) > 0)
    mean = y0 * np.exp(-theta)
    var = sigma**2 * (1 - np.exp(-2 * theta)) / (2 * theta)
    # Five standard errors of the sample mean and of the sample variance.
    assert abs(ys.mean() - mean) < 5 * np.sqrt(var / num)
    assert abs(ys.var() - var) < 5 * var * np.sqrt(2 / num)
    assert scipy.stats.kstest((ys - mean) / np.sqrt(var), "norm").pvalue > KS_P


@pytest.mark.slow
def test_strong_order_of_a_solver_using_space_time_levy_area():
    # SRA1 is strong order 1.5 for additive noise only with the space-time Lévy area
    # H; coarse steps span many pieces, so H must combine correctly across them.
    fine = 2**-9
    dts = [2**-3, 2**-4, 2**-5, 2**-6]

    def solve(bm, dt):
        terms = dfx.MultiTerm(
            dfx.ODETerm(lambda t, y, args: -jnp.sin(y) + jnp.cos(t)),
            dfx.ControlTerm(lambda t, y, args: jnp.array([1.0, 0.7]), bm),
        )
        sol = dfx.diffeqsolve(terms, dfx.SRA1(), T0, T1, dt, jnp.array(0.4))
        assert sol.ys is not None
        return sol.ys[-1]

    @jax.jit
    @jax.vmap
    def errors(key):
        bm = dxe.BrownianInterval(
            T0, T1, fine, (2,), key, levy_area=dfx.SpaceTimeLevyArea, dt=fine
        )
        reference = solve(bm, fine)
        return jnp.stack([jnp.abs(solve(bm, dt) - reference) for dt in dts])

    mean_error = np.asarray(errors(jr.split(jr.PRNGKey(10), 200))).mean(axis=0)
    order = np.polyfit(np.log(dts), np.log(mean_error), 1)[0]
    # Without H (or with H combined wrongly across pieces) the order would be 1. The
    # drift's own error is of order 2, so the measured slope may exceed 1.5.
    assert order > 1.3, (order, mean_error)


def test_gradients_through_diffrax_adjoints():
    # DirectAdjoint differentiates the same discretised solve as
    # RecursiveCheckpointAdjoint; BacksolveAdjoint solves the continuous adjoint SDE
    # backwards through the same path, so it agrees only up to the discretisation
    # error of the two solves (measured at about 3e-5 relative here).
    bm = _path(jr.PRNGKey(11), shape=(2,), dt=0.01)

    @eqx.filter_jit
    def grad(theta, adjoint):
        def loss(theta):
            terms = dfx.MultiTerm(
                dfx.ODETerm(lambda t, y, args: -args * y),
                dfx.ControlTerm(lambda t, y, args: 0.3 * jnp.diag(jnp.sin(y)), bm),
            )
            sol = dfx.diffeqsolve(
                terms,
                dfx.Heun(),
                T0,
                T1,
                0.01,
                jnp.array([1.0, 0.5]),
                args=theta,
                adjoint=adjoint,
                # 100 steps: a small budget compiles DirectAdjoint's and the
                # checkpoints' loops faster.
                max_steps=100,
            )
            assert sol.ys is not None
            return jnp.sum(sol.ys)

        return jax.grad(loss)(theta)

    theta = jnp.array(0.7)
    reference = grad(theta, backprop(100))
    direct = grad(theta, dfx.DirectAdjoint())
    backsolve = grad(theta, dfx.BacksolveAdjoint())
    np.testing.assert_allclose(direct, reference, rtol=1e-12)
    np.testing.assert_allclose(backsolve, reference, rtol=1e-3)
