"""Per-path gradients of the SDE-GAN generator, and what the reconstruction check makes
of them, in float32 and float64.

The generator of `examples/sde_gan.py` (a neural SDE, hidden state 16, reversible
Heun, 64 steps of 1, each path with its own Brownian motion) at initialisation, its
parameters drawn in the dtype measured. For each path, the gradient with respect to
the generator's parameters of a fixed linear functional of its 64 outputs (a
stand-in for the discriminator), by `ReversibleAdjoint(reconstruction_tol=None)`
against `RecursiveCheckpointAdjoint` on the same solve (the exact gradient of the
same discretised solve); the error is measured as in `reconstruction_check.py`: max
over leaves of max|g - g_ref| / max|g_ref|. Beside it, the reconstruction check's
metric for the same path, computed as `ReversibleAdjoint`'s backward pass computes it
(`reconstruction_check.check_metric`), and the paths the check refuses at each
tolerance of a sweep. A gradient is right within 1e-3, wrong beyond 1e-2, as there.

The question it answers: are the check's refusals of float32 paths (the example
trains in float64 because of them) false alarms? Not if the metric tracks the error
path by path and the paths refused are those with large errors.

Full mode measures 64 paths of each of 4 initialisations of the generator (the
example's and 3 others), quick mode 32 of 2, tiny mode 8 of 1 (float32 only).

Writes `benchmarks/results/sde_gan_gradients{_quick,_tiny}.{json,md}`.

Run: `python benchmarks/sde_gan_gradients.py [--mode full|quick|tiny]`.
"""

import time

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from _common import (
    bar_chart,
    describe,
    log,
    machine,
    markdown_table,
    parse_args,
    relative_error,
    save,
)


jax.config.update("jax_enable_x64", True)
from reconstruction_check import check_metric, RIGHT, sci, SWEEP, WRONG  # noqa: E402
from sde_gan_step import load_example  # noqa: E402

import diffrax_extras as dxe  # noqa: E402
from diffrax_extras._adjoint.reconstruction import RECONSTRUCTION_TOL  # noqa: E402


# Initialisations of the generator, paths of each, and dtypes, by mode. Tiny mode
# (run by the test suite) leaves out float64, whose compilations would double its
# time.
GENERATORS = {"full": 4, "device": 4, "quick": 2, "tiny": 1}
PATHS = {"full": 64, "device": 64, "quick": 32, "tiny": 8}
BOTH = (jnp.float32, jnp.float64)
DTYPES = {"full": BOTH, "device": BOTH, "quick": BOTH, "tiny": (jnp.float32,)}


def generators(example, config, dtype, count):
    """`count` initialisations of the generator in `dtype`: the one
    `examples/sde_gan.py` starts training from, then others."""
    _, train_key, _ = jr.split(jr.key(5678), 3)
    keys = [jr.split(jr.split(train_key)[0])[0], *jr.split(jr.key(11), count - 1)]
    unchecked = dxe.ReversibleAdjoint(reconstruction_tol=None)
    return [example.Generator(config, unchecked, dtype, key=k) for k in keys]


def path_gradients(generator, keys, weights):
    @eqx.filter_jit
    @eqx.filter_vmap(in_axes=(None, 0))
    @eqx.filter_grad
    def grad(generator, key):
        return jnp.sum(weights * generator(key)[:, 1])

    return eqx.filter(grad(generator, keys), eqx.is_inexact_array)


def path_metrics(generator, keys):
    @eqx.filter_jit
    @eqx.filter_vmap(in_axes=(None, 0))
    def metric(generator, key):
        terms, h0, ts = generator.problem(key)
        sol = generator.solve(key, dfx.SaveAt(steps=True, solver_state=True))
        assert sol.ts is not None and sol.ys is not None
        steps = sol.stats["num_steps"]
        step_ts = jnp.concatenate([ts[:1], sol.ts])
        y_error, state_error, _ = check_metric(
            dxe.ReversibleHeun(),
            terms,
            step_ts,
            steps,
            h0,
            None,
            sol.ys[steps - 1],
            sol.solver_state,
        )
        return jnp.maximum(y_error, state_error)

    return np.asarray(metric(generator, keys), np.float64)


def measure_one(generator, keys, weights):
    """Each path's gradient error and the check's metric there."""
    exact = eqx.tree_at(
        lambda g: g.adjoint, generator, dfx.RecursiveCheckpointAdjoint()
    )
    ours = path_gradients(generator, keys, weights)
    reference = path_gradients(exact, keys, weights)
    errors = [
        relative_error(
            jax.tree.map(lambda a, i=i: a[i], reference),
            jax.tree.map(lambda a, i=i: a[i], ours),
        )
        for i in range(len(keys))
    ]
    return np.array(errors), path_metrics(exact, keys)


def measure(example, config, dtype, mode) -> dict:
    start = time.perf_counter()
    count, per = GENERATORS[mode], PATHS[mode]
    keys = jr.split(jr.key(3), per)
    weights = jr.normal(jr.key(7), (config.t_size,), dtype)
    errors, metrics, refused_each = [], [], []
    for generator in generators(example, config, dtype, count):
        e, m = measure_one(generator, keys, weights)
        errors.append(e)
        metrics.append(m)
        passed = m.astype(np.float32) <= np.float32(RECONSTRUCTION_TOL)
        refused_each.append(int((~passed).sum()))
    errors, metrics = np.concatenate(errors), np.concatenate(metrics)
    right, wrong = errors <= RIGHT, errors > WRONG
    sweep = []
    for tol in sorted({*SWEEP, RECONSTRUCTION_TOL, 2e-2, 5e-2}):
        refused = ~(metrics.astype(np.float32) <= np.float32(tol))
        sweep.append(
            dict(
                tolerance=tol,
                refused=int(refused.sum()),
                right_refused=int((refused & right).sum()),
                wrong_passed=int((~refused & wrong).sum()),
            )
        )
    with np.errstate(divide="ignore"):
        correlation = float(np.corrcoef(np.log(errors), np.log(metrics))[0, 1])
    row = dict(
        dtype=jnp.dtype(dtype).name,
        generators=count,
        paths=len(errors),
        # Paths refused at the default, for each initialisation.
        refused_per_generator=refused_each,
        error_median=float(np.median(errors)),
        error_max=float(errors.max()),
        right=int(right.sum()),
        wrong=int(wrong.sum()),
        metric_median=float(np.median(metrics)),
        metric_max=float(metrics.max()),
        # How closely the metric follows the error, path by path.
        log_correlation=correlation,
        error_over_metric=float(np.median(errors / metrics)),
        refused_at_default=next(
            s["refused"] for s in sweep if s["tolerance"] == RECONSTRUCTION_TOL
        ),
        sweep=sweep,
        seconds=round(time.perf_counter() - start, 2),
    )
    log(**{k: v for k, v in row.items() if k != "sweep"})
    return row


def fmt(x: float) -> str:
    return f"{x:.1e}"


def markdown(rows, info, seconds) -> str:
    header = [
        "dtype",
        "paths:",
        "gradient error: median:",
        "max:",
        "right (≤ 1e-3):",
        "wrong (> 1e-2):",
        "check's metric: median:",
        "max:",
        "error / metric (median):",
        "log correlation:",
        f"refused at the default {sci(RECONSTRUCTION_TOL)}:",
        "of each initialisation",
    ]
    table = [
        [
            r["dtype"],
            r["paths"],
            fmt(r["error_median"]),
            fmt(r["error_max"]),
            r["right"],
            r["wrong"],
            fmt(r["metric_median"]),
            fmt(r["metric_max"]),
            f"{r['error_over_metric']:.2f}",
            f"{r['log_correlation']:.2f}",
            r["refused_at_default"],
            ", ".join(str(n) for n in r["refused_per_generator"]),
        ]
        for r in rows
    ]
    float32 = next(r for r in rows if r["dtype"] == "float32")
    sweep = [
        [sci(s["tolerance"]), s["refused"], s["right_refused"], s["wrong_passed"]]
        for s in float32["sweep"]
    ]
    return (
        f"{describe(info)} The SDE-GAN generator of `examples/sde_gan.py` at "
        f"{rows[0]['generators']} initialisations (the example's first), "
        f"{rows[0]['paths'] // rows[0]['generators']} paths each: per-path "
        "gradients of `ReversibleAdjoint` (check off) against "
        "`RecursiveCheckpointAdjoint` on the same solve, and the reconstruction "
        f"check's metric on the same paths. {seconds:.0f} s in all.\n\n"
        + markdown_table(header, table)
        + "\n\nFloat32, by tolerance:\n\n"
        + markdown_table(
            [
                "reconstruction_tol",
                "paths refused:",
                "right ones refused:",
                "wrong ones passed:",
            ],
            sweep,
        )
    )


def main():
    args = parse_args(__doc__, repeats=1)
    start = time.perf_counter()
    info = machine()
    example = load_example()
    rows = [measure(example, example.SMALL, d, args.mode) for d in DTYPES[args.mode]]
    seconds = time.perf_counter() - start
    payload = dict(machine=info, seconds=seconds, rows=rows)
    save("sde_gan_gradients", args, payload, markdown(rows, info, seconds))


# The runner's report (`python -m benchmarks`): this section's title, its rows
# in the headline table, and its chart.
TITLE = "SDE-GAN generator: per-path gradient errors and the reconstruction check"


def headline(data) -> list[dict]:
    # Its own table: diffrax has no such check to compare with.
    return []


def chart(data, path) -> None:
    float32 = next(r for r in data["rows"] if r["dtype"] == "float32")
    labels = [f"tolerance {s['tolerance']:g}" for s in float32["sweep"]]
    series = {
        "refused": [s["refused"] for s in float32["sweep"]],
        "right ones refused": [s["right_refused"] for s in float32["sweep"]],
        "wrong ones passed": [s["wrong_passed"] for s in float32["sweep"]],
    }
    bar_chart(path, TITLE + " (float32)", labels, series, "paths")


if __name__ == "__main__":
    main()
