"""`BrownianInterval`: laws, consistency and use inside `diffeqsolve`.

The statistical tests use fixed seeds, so they are deterministic. Each compares a
sample of 20,000 draws with its exact law: a Kolmogorov–Smirnov p-value above
`KS_P = 1e-4` per column, and sample means, variances and correlations within 5
standard errors of 0, 1 and 0.
(A correct sampler fails a given check with probability about 1e-4, and the seeds
are fixed, so a failure means a wrong law, not bad luck.)
"""

import functools as ft
from typing import cast

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import scipy.stats

import diffrax_extras as dxe


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
    assert np.max(np.abs(off_diagonal)) < 5 / np.sqrt(NUM_SAMPLES)


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


def test_bitwise_consistent_under_reordering_reversal_and_repetition():
    rng = np.random.default_rng(4)
    starts = rng.uniform(T0, T1, 40)
    ends = np.clip(starts + rng.uniform(-0.3, 0.3, 40), T0, T1)
    starts[:4] = [0.2, 0.3, 0.0, 0.15]
    ends[:4] = [0.3, 0.2, 1.0, 0.15]  # a piece, reversed, the whole, empty
    bm = _path(jr.PRNGKey(5), dfx.SpaceTimeTimeLevyArea, shape=(3,))

    # The path is an argument, as it is inside `diffeqsolve`: a path closed over by
    # `jax.jit` would make its times compile-time constants, which XLA folds.
    @eqx.filter_jit
    def query(bm, s, t):
        inc = bm.evaluate(s, t, use_levy=True)
        return jnp.stack([inc.W, inc.H, inc.K])

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

    # Under `jax.vmap` XLA fuses the normal draws with the bridge arithmetic
    # differently and may contract multiply-adds differently from the unbatched
    # program (this changes `jax.random.normal`'s own last bits too), so here the
    # agreement is to rounding (relative to each quantity's scale) rather than
    # bitwise.
    batched = np.asarray(
        eqx.filter_jit(jax.vmap(query, in_axes=(None, 0, 0)))(bm, starts, ends)
    )
    scale = np.max(np.abs(one_by_one), axis=(0, 2), keepdims=True)
    assert np.all(np.abs(batched - one_by_one) <= 1e-14 * scale)


def test_piece_boundaries_and_ends_absorb_rounding():
    bm = _path(jr.PRNGKey(6), dfx.SpaceTimeLevyArea, shape=(2,))
    query = eqx.filter_jit(lambda bm, s, t: bm.evaluate(s, t, use_levy=True))

    def evaluate(s, t):
        return query(bm, jnp.array(s, jnp.float64), jnp.array(t, jnp.float64))

    def nudge(t, ulps):
        return np.float64(t) + ulps * np.spacing(np.float64(max(abs(t), 1.0)))

    for s, t in [(0.3, 0.4), (T0, 0.1), (0.9, T1), (0.2, 0.7), (T0, T1)]:
        exact = evaluate(s, t)
        for ds, de in [(-2, 3), (1, -1), (3, 2)]:
            near = evaluate(max(nudge(s, ds), T0), min(nudge(t, de), T1))
            np.testing.assert_array_equal(near.W, exact.W)
            np.testing.assert_array_equal(near.H, exact.H)
    # 0.1 * 3 != 0.3 in floating point: the boundary is found either way.
    np.testing.assert_array_equal(evaluate(3 * 0.1, 4 * 0.1).W, evaluate(0.3, 0.4).W)


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
            )
            assert sol.ys is not None
            return jnp.sum(sol.ys)

        return jax.grad(loss)(theta)

    theta = jnp.array(0.7)
    reference = grad(theta, dfx.RecursiveCheckpointAdjoint())
    direct = grad(theta, dfx.DirectAdjoint())
    backsolve = grad(theta, dfx.BacksolveAdjoint())
    np.testing.assert_allclose(direct, reference, rtol=1e-12)
    np.testing.assert_allclose(backsolve, reference, rtol=1e-3)
