"""Side by side with the PyTorch libraries a user would pick instead of this package.

The same problems, the same sizes and (where both sides have one) the same
parameters and initial values on both sides; the Brownian samples differ (each
library draws its own). Both sides run in the same process, on the same number of
threads: one core each (`torch.set_num_threads(1)`; XLA with
`--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`), and all cores
(torch's OpenMP with `OMP_WAIT_POLICY=PASSIVE`: its default spinning wait stalls
badly when other work loads the machine).
Each thread count and each precision runs in its own process.

- Neural SDE gradient (state 32, drift and diffusion MLPs 64 wide, 8 noise channels,
  general Stratonovich noise, batch 256, saved at the 10 times 0.1, 0.2, ..., 1 (on
  the step grid, which torchsde's reversible Heun adjoint needs to be exact), N = 100
  and 1,000 fixed steps, float32):
  torchsde `sdeint_adjoint(method='reversible_heun',
  adjoint_method='adjoint_reversible_heun')` with its `BrownianInterval` against our
  `ReversibleHeun` + `BrownianInterval` + `ReversibleAdjoint`; torchsde
  `sdeint(method='midpoint')` (backpropagation through the solver, its
  `BrownianInterval`) against diffrax's `Midpoint` + `VirtualBrownianTree` +
  `RecursiveCheckpointAdjoint`.
- Brownian increments: N = 1,000 consecutive steps of shape (256, 16) from a fresh
  path: torchsde's `BrownianInterval(dt=h)` against ours (`tol=h/2, dt=h`).
- MALI neural ODE gradient (state 32, MLP two hidden layers 64 wide, tanh, batch 256,
  N = 1,000 fixed steps, damping 1, float32): TorchDiffEqPack
  `odesolve_adjoint_sym12(method='fixedstep_sym12async')` against our
  `AsynchronousLeapfrog` + `ReversibleAdjoint`.
- Gauss–Legendre adjoint on a wide MLP (state 4, two hidden layers of width 1024,
  tanh, minus y/2, 10 saved times on [0, 2], Dopri5, rtol 1e-6, atol 1e-8,
  float64): our `GaussLegendreAdjoint()` against torch_gq_adjoint where it can be
  installed, and against torchdiffeq's `odeint_adjoint` (the continuous adjoint a
  PyTorch user has without it), with its default error norm and with the seminorm
  that leaves the parameters' adjoint out of the backward step control.
  torch_gq_adjoint's own 1-D example likewise.
- Gradient exactness of each against its own library's backpropagation through the
  same solve (torchsde `sdeint`, TorchDiffEqPack `odesolve`, torchdiffeq `odeint`,
  diffrax `RecursiveCheckpointAdjoint` with a checkpoint at every fixed step), in
  float32 and float64, with the same Brownian sample on both sides of each
  comparison.

Times are medians of interleaved pairs (ours, then the peer, repeated) after one
warm-up call each; the JAX side is compiled first. Compile time and the warm-up call
are reported, not counted. Per-pair ranges are the smallest and largest ratio of the
peer's time to ours over the pairs. The load average of the machine before and after
each process is recorded.

Needs the optional dependencies: `pip install -e ".[peers]"` (torch, torchsde,
torchdiffeq, TorchDiffEqPack). Writes
`benchmarks/results/peers{_quick,_tiny}.{json,md}`.

Run: `python benchmarks/peers.py [--mode full|quick|tiny]`.
"""

import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from _common import (
    bar_chart,
    compile_timed,
    describe,
    log,
    machine,
    markdown_table,
    parse_args,
    relative_error,
    save,
)

import diffrax_extras as dxe


SIZES = {
    # mode: SDE (step counts, batch, state, noise, width), Brownian (N, shape),
    # MALI (N, batch, state, width), GQ widths, thread settings
    "full": dict(
        sde=([100, 1000], 256, 32, 8, 64),
        brownian=(1000, (256, 16)),
        mali=(1000, 256, 32, 64),
        gq=[1024],
        threads=["1", "all"],
    ),
    "quick": dict(
        sde=([100], 256, 32, 8, 64),
        brownian=(1000, (256, 16)),
        mali=(200, 256, 32, 64),
        gq=[256],
        threads=["1", "all"],
    ),
    "tiny": dict(
        sde=([10], 4, 4, 2, 8),
        brownian=(10, (4, 2)),
        mali=(10, 4, 4, 8),
        gq=[8],
        threads=["all"],
    ),
}
GQ_DIM, GQ_T1, GQ_RTOL, GQ_ATOL = 4, 2.0, 1e-6, 1e-8
SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
PEERS = ["torch", "torchsde", "torchdiffeq", "TorchDiffEqPack", "torch_gq_adjoint"]
GQ_PEER = "torch_gq_adjoint"
GQ_PEER_MISSING = (
    "skipped: torch_gq_adjoint is not installed (it is not on the package index: "
    "`pip install torch_gq_adjoint` finds no distribution)"
)
GQ_PEER_UNBOUND = (
    "skipped: torch_gq_adjoint is importable, but this script has no binding for "
    "its interface"
)


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def versions() -> dict:
    out = {}
    for name in PEERS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


# ---------------------------------------------------------------------------------
# Timing


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int):
    """Seconds of one warm-up call of each function, then of `repeats` rounds in
    which every function runs once, in turn."""
    warmup = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(fn())
        warmup[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return warmup, times


def pair_rows(problem, ours, peer, fns, compile_s, repeats, context, unit=1e3):
    """Rows for one (ours, peer) pair timed interleaved; `fns` maps the two names to
    zero-argument calls. `unit` scales seconds to the reported unit."""
    warmup, times = interleaved_times(fns, repeats)
    ratios = [p / o for o, p in zip(times[ours], times[peer], strict=True)]
    rows = []
    for side, name in (("ours", ours), ("peer", peer)):
        ts = times[name]
        rows.append(
            dict(
                problem=problem,
                side=side,
                configuration=name,
                median=unit * statistics.median(ts),
                min=unit * min(ts),
                max=unit * max(ts),
                warmup_seconds=warmup[name],
                compile_seconds=compile_s.get(name),
                peer_over_ours=statistics.median(ratios),
                pair_ratio_min=min(ratios),
                pair_ratio_max=max(ratios),
                **context,
            )
        )
        log(**{k: v for k, v in rows[-1].items() if k not in ("problem",)})
    return rows


# ---------------------------------------------------------------------------------
# The models, built in JAX and copied into torch so both sides hold the same numbers


def mlp(in_size, out_size, width, depth, activation, final=None, *, key):
    kw = {} if final is None else dict(final_activation=final)
    return eqx.nn.MLP(in_size, out_size, width, depth, activation, key=key, **kw)


def torch_mlp(jax_mlp, activation, final=None):
    import torch  # pyright: ignore[reportMissingImports]

    layers = []
    for i, layer in enumerate(jax_mlp.layers):
        out_size, in_size = layer.weight.shape
        linear = torch.nn.Linear(in_size, out_size)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.array(layer.weight)))
            linear.bias.copy_(torch.from_numpy(np.array(layer.bias)))
        layers.append(linear)
        if i < len(jax_mlp.layers) - 1:
            layers.append(activation())
        elif final is not None:
            layers.append(final())
    return torch.nn.Sequential(*layers)


def torch_dtype():
    import torch  # pyright: ignore[reportMissingImports]

    return torch.float64 if jax.config.read("jax_enable_x64") else torch.float32


def torch_tensor(x):
    import torch  # pyright: ignore[reportMissingImports]

    return torch.from_numpy(np.array(x))


# ---------------------------------------------------------------------------------
# Neural SDE


class JaxSDE(eqx.Module):
    drift: eqx.nn.MLP
    diffusion: eqx.nn.MLP
    noise: int = eqx.field(static=True)

    def __init__(self, state, noise, width, *, key):
        k1, k2 = jr.split(key)
        self.drift = mlp(state, state, width, 1, jax.nn.silu, key=k1)
        self.diffusion = mlp(
            state, state * noise, width, 1, jax.nn.silu, jnp.tanh, key=k2
        )
        self.noise = noise


def backprop(num_steps):
    """Backpropagation through every step: a checkpoint at each one. diffrax 0.7.2's
    default binomial schedule is not a safe reference here: in float32, with
    `max_steps` equal to the number of fixed steps, it doubles the cotangent of the
    output saved at t = 0.6 (N = 100; `DirectAdjoint`, forward mode and finite
    differences agree with each other and with `ReversibleAdjoint`), which made the
    gradient it returns 11% off."""
    return dfx.RecursiveCheckpointAdjoint(checkpoints=num_steps)


SDE_STACKS = {
    # name: (solver, Brownian path, adjoint from the number of steps)
    "ReversibleHeun + BrownianInterval + ReversibleAdjoint": (
        dxe.ReversibleHeun,
        "BrownianInterval",
        lambda _: dxe.ReversibleAdjoint(),
    ),
    "ReversibleHeun + BrownianInterval + RecursiveCheckpoint (backprop)": (
        dxe.ReversibleHeun,
        "BrownianInterval",
        backprop,
    ),
    "diffrax Midpoint + VirtualBrownianTree + RecursiveCheckpoint": (
        dfx.Midpoint,
        "VirtualBrownianTree",
        lambda _: dfx.RecursiveCheckpointAdjoint(),
    ),
}
OURS_SDE = "ReversibleHeun + BrownianInterval + ReversibleAdjoint"
OURS_SDE_REF = "ReversibleHeun + BrownianInterval + RecursiveCheckpoint (backprop)"
DIFFRAX_MIDPOINT = "diffrax Midpoint + VirtualBrownianTree + RecursiveCheckpoint"
TORCHSDE_REV = "torchsde reversible_heun + adjoint_reversible_heun (sdeint_adjoint)"
TORCHSDE_REV_REF = "torchsde reversible_heun + backprop (sdeint)"
TORCHSDE_MIDPOINT = "torchsde midpoint + backprop (sdeint)"


def jax_sde_grad(stack, num_steps, static, noise):
    solver, path, adjoint = SDE_STACKS[stack]
    h = 1.0 / num_steps
    save_ts = jnp.linspace(0.1, 1, 10)

    def solve(model, y0, key):
        if path == "VirtualBrownianTree":
            bm = dfx.VirtualBrownianTree(0.0, 1.0, h / 2, (noise,), key)
        else:
            bm = dxe.BrownianInterval(0.0, 1.0, h / 2, (noise,), key, dt=h)
        terms = dfx.MultiTerm(
            dfx.ODETerm(lambda t, y, args: model.drift(y)),
            dfx.ControlTerm(
                lambda t, y, args: model.diffusion(y).reshape(y.shape[0], noise), bm
            ),
        )
        sol = dfx.diffeqsolve(
            terms,
            solver(),
            0.0,
            1.0,
            h,
            y0,
            saveat=dfx.SaveAt(ts=save_ts),
            adjoint=adjoint(num_steps),
            max_steps=num_steps,
        )
        assert sol.ys is not None
        return sol.ys

    @jax.jit
    def grad(params, y0, keys):
        def loss(params):
            model = eqx.combine(params, static)
            ys = jax.vmap(lambda y, k: solve(model, y, k))(y0, keys)
            return jnp.mean((ys - 0.5) ** 2)

        return jax.value_and_grad(loss)(params)

    return grad


def torch_sde(model: JaxSDE, state, noise):
    import torch  # pyright: ignore[reportMissingImports]

    class SDE(torch.nn.Module):
        noise_type = "general"
        sde_type = "stratonovich"

        def __init__(self):
            super().__init__()
            self.drift = torch_mlp(model.drift, torch.nn.SiLU)
            self.diffusion = torch_mlp(model.diffusion, torch.nn.SiLU, torch.nn.Tanh)

        def f(self, t, y):
            return self.drift(y)

        def g(self, t, y):
            return self.diffusion(y).view(y.shape[0], state, noise)

    return SDE().to(torch_dtype())


def torch_sde_grad(sde, method, adjoint, num_steps, y0, batch, noise, entropy):
    import torch  # pyright: ignore[reportMissingImports]
    import torchsde  # pyright: ignore[reportMissingImports]

    h = 1.0 / num_steps
    ts = torch.linspace(0, 1, 11, dtype=y0.dtype)
    params = list(sde.parameters())

    def grad(entropy=entropy):
        bm = torchsde.BrownianInterval(
            0.0, 1.0, size=(batch, noise), dtype=y0.dtype, entropy=entropy, dt=h
        )
        if adjoint:
            ys = torchsde.sdeint_adjoint(
                sde,
                y0,
                ts,
                bm=bm,
                method=method,
                adjoint_method="adjoint_reversible_heun",
                dt=h,
            )
        else:
            ys = torchsde.sdeint(sde, y0, ts, bm=bm, method=method, dt=h)
        assert isinstance(ys, torch.Tensor)
        loss = torch.mean((ys[1:] - 0.5) ** 2)
        return (loss.detach(), *torch.autograd.grad(loss, params))

    return grad


def sde_setup(batch, state, noise, width):
    model_key, y_key, bm_key = jr.split(jr.PRNGKey(0), 3)
    model = JaxSDE(state, noise, width, key=model_key)
    params, static = eqx.partition(model, eqx.is_array)
    y0 = jr.normal(y_key, (batch, state))
    keys = jr.split(bm_key, batch)
    return model, params, static, y0, keys


def sde_timing(cfg, repeats, context):
    grid, batch, state, noise, width = cfg["sde"]
    model, params, static, y0, keys = sde_setup(batch, state, noise, width)
    sde = torch_sde(model, state, noise)
    y0_torch = torch_tensor(y0)
    rows = []
    for n in grid:
        problem = (
            f"neural SDE gradient, N = {n} (state {state}, MLPs {width} wide, "
            f"{noise} noise channels, batch {batch})"
        )
        compile_s, fns = {}, {}
        for stack in (OURS_SDE, DIFFRAX_MIDPOINT):
            fn, seconds = compile_timed(
                jax_sde_grad(stack, n, static, noise), params, y0, keys
            )
            compile_s[stack] = seconds
            fns[stack] = lambda fn=fn: fn(params, y0, keys)
        fns[TORCHSDE_REV] = torch_sde_grad(
            sde, "reversible_heun", True, n, y0_torch, batch, noise, 0
        )
        fns[TORCHSDE_MIDPOINT] = torch_sde_grad(
            sde, "midpoint", False, n, y0_torch, batch, noise, 0
        )
        for ours, peer in (
            (OURS_SDE, TORCHSDE_REV),
            (DIFFRAX_MIDPOINT, TORCHSDE_MIDPOINT),
        ):
            pair = {ours: fns[ours], peer: fns[peer]}
            rows += pair_rows(problem, ours, peer, pair, compile_s, repeats, context)
    return rows


def sde_exactness(cfg, context):
    grid, batch, state, noise, width = cfg["sde"]
    model, params, static, y0, keys = sde_setup(batch, state, noise, width)
    sde = torch_sde(model, state, noise)
    y0_torch = torch_tensor(y0)
    rows = []
    for n in grid:
        problem = f"neural SDE gradient, N = {n}"
        ours = jax_sde_grad(OURS_SDE, n, static, noise)(params, y0, keys)[1]
        ref = jax_sde_grad(OURS_SDE_REF, n, static, noise)(params, y0, keys)[1]
        rows.append(
            dict(
                problem=problem,
                side="ours",
                configuration=OURS_SDE,
                reference=OURS_SDE_REF,
                error=relative_error(ref, ours),
                **context,
            )
        )
        peer = torch_sde_grad(
            sde, "reversible_heun", True, n, y0_torch, batch, noise, 0
        )
        peer_ref = torch_sde_grad(
            sde, "reversible_heun", False, n, y0_torch, batch, noise, 0
        )
        theirs, theirs_ref = peer()[1:], peer_ref()[1:]
        rows.append(
            dict(
                problem=problem,
                side="peer",
                configuration=TORCHSDE_REV,
                reference=TORCHSDE_REV_REF,
                error=relative_error(
                    [t.numpy() for t in theirs_ref], [t.numpy() for t in theirs]
                ),
                **context,
            )
        )
        log(**rows[-2])
        log(**rows[-1])
    return rows


# ---------------------------------------------------------------------------------
# Brownian increments


def brownian_timing(cfg, repeats, context):
    import torch  # pyright: ignore[reportMissingImports]
    import torchsde  # pyright: ignore[reportMissingImports]

    n, shape = cfg["brownian"]
    h = 1.0 / n
    grid = np.linspace(0.0, 1.0, n + 1)
    starts, ends = jnp.asarray(grid[:-1]), jnp.asarray(grid[1:])
    ours, peer = (
        "ours: BrownianInterval(tol=h/2, dt=h)",
        "torchsde BrownianInterval(dt=h)",
    )

    @jax.jit
    def increments(key):
        path = dxe.BrownianInterval(0.0, 1.0, h / 2, shape, key, dt=h)

        def body(total, query):
            w = path.evaluate(*query)
            assert isinstance(w, jax.Array)
            return total + jnp.sum(w), None

        return jax.lax.scan(body, jnp.zeros(()), (starts, ends))[0]

    key = jr.PRNGKey(0)
    fn, compile_s = compile_timed(increments, key)
    torch_grid = [float(t) for t in grid]

    def torch_increments():
        bm = torchsde.BrownianInterval(
            0.0, 1.0, size=shape, dtype=torch_dtype(), entropy=0, dt=h
        )
        total = torch.zeros((), dtype=torch_dtype())
        for s, t in zip(torch_grid[:-1], torch_grid[1:], strict=True):
            total = total + bm(s, t).sum()
        return total

    problem = f"Brownian increments, N = {n} consecutive steps of shape {shape}"
    fns = {ours: lambda: fn(key), peer: torch_increments}
    return pair_rows(
        problem, ours, peer, fns, {ours: compile_s}, repeats, context, unit=1e6 / n
    )


# ---------------------------------------------------------------------------------
# MALI neural ODE

OURS_MALI = "AsynchronousLeapfrog + ReversibleAdjoint"
OURS_MALI_REF = "AsynchronousLeapfrog + RecursiveCheckpoint (backprop)"
TDEP_MALI = "TorchDiffEqPack MALI (odesolve_adjoint_sym12, fixedstep_sym12async)"
TDEP_MALI_REF = "TorchDiffEqPack fixedstep_sym12async + backprop (odesolve)"


def mali_setup(batch, state, width):
    key_mlp, key_y = jr.split(jr.PRNGKey(1))
    model = mlp(state, state, width, 2, jnp.tanh, key=key_mlp)
    y0 = jr.normal(key_y, (batch, state))
    return model, y0


def jax_mali_grad(adjoint, num_steps, static):
    @jax.jit
    def grad(params, y0):
        def loss(params):
            model = eqx.combine(params, static)
            sol = dfx.diffeqsolve(
                dfx.ODETerm(lambda t, y, args: jax.vmap(model)(y)),
                dxe.AsynchronousLeapfrog(damping=1.0),
                0.0,
                1.0,
                1.0 / num_steps,
                y0,
                adjoint=adjoint,
                max_steps=num_steps,
            )
            assert sol.ys is not None
            return jnp.mean(sol.ys**2)

        return jax.value_and_grad(loss)(params)

    return grad


def torch_mali_grad(model, num_steps, y0, adjoint):
    import torch  # pyright: ignore[reportMissingImports]
    from TorchDiffEqPack import (  # pyright: ignore[reportMissingImports]
        odesolve,
        odesolve_adjoint_sym12,
    )

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = torch_mlp(model, torch.nn.Tanh)

        def forward(self, t, y):
            return self.mlp(y)

    func = Field().to(torch_dtype())
    params = list(func.parameters())

    def grad():
        options = dict(
            method="fixedstep_sym12async",
            h=1.0 / num_steps,
            t0=0.0,
            t1=1.0,
            rtol=1e-3,
            atol=1e-6,
            print_neval=False,
            neval_max=10 * num_steps,
        )
        if adjoint:
            y1 = odesolve_adjoint_sym12(func, y0, options=options)
        else:
            y1 = odesolve(func, y0, options=options)
        loss = torch.mean(y1**2)
        return (loss.detach(), *torch.autograd.grad(loss, params))

    return grad


def mali_timing(cfg, repeats, context):
    n, batch, state, width = cfg["mali"]
    model, y0 = mali_setup(batch, state, width)
    params, static = eqx.partition(model, eqx.is_array)
    fn, compile_s = compile_timed(
        jax_mali_grad(dxe.ReversibleAdjoint(), n, static), params, y0
    )
    fns = {
        OURS_MALI: lambda: fn(params, y0),
        TDEP_MALI: torch_mali_grad(model, n, torch_tensor(y0), True),
    }
    problem = (
        f"MALI neural ODE gradient, N = {n} (state {state}, MLP 2 x {width}, "
        f"batch {batch})"
    )
    return pair_rows(
        problem, OURS_MALI, TDEP_MALI, fns, {OURS_MALI: compile_s}, repeats, context
    )


def mali_exactness(cfg, context):
    n, batch, state, width = cfg["mali"]
    model, y0 = mali_setup(batch, state, width)
    params, static = eqx.partition(model, eqx.is_array)
    ours = jax_mali_grad(dxe.ReversibleAdjoint(), n, static)(params, y0)[1]
    ref = jax_mali_grad(backprop(n), n, static)(params, y0)[1]
    theirs = torch_mali_grad(model, n, torch_tensor(y0), True)()[1:]
    theirs_ref = torch_mali_grad(model, n, torch_tensor(y0), False)()[1:]
    problem = f"MALI neural ODE gradient, N = {n}"
    rows = [
        dict(
            problem=problem,
            side="ours",
            configuration=OURS_MALI,
            reference=OURS_MALI_REF,
            error=relative_error(ref, ours),
            **context,
        ),
        dict(
            problem=problem,
            side="peer",
            configuration=TDEP_MALI,
            reference=TDEP_MALI_REF,
            error=relative_error(
                [t.numpy() for t in theirs_ref], [t.numpy() for t in theirs]
            ),
            **context,
        ),
    ]
    for row in rows:
        log(**row)
    return rows


# ---------------------------------------------------------------------------------
# Gauss–Legendre adjoint

OURS_GQ = "GaussLegendreAdjoint() + Dopri5"
OURS_GQ_REF = "Dopri5 + RecursiveCheckpoint (backprop)"
TORCHDIFFEQ_ADJ = "torchdiffeq odeint_adjoint (dopri5)"
TORCHDIFFEQ_SEMI = "torchdiffeq odeint_adjoint (dopri5, adjoint seminorm)"
TORCHDIFFEQ_REF = "torchdiffeq odeint (dopri5) + backprop"


class GQField(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return self.mlp(y) - 0.5 * y


def gq_setup(width):
    key_mlp, key_y = jr.split(jr.PRNGKey(2))
    field = GQField(mlp(GQ_DIM, GQ_DIM, width, 2, jnp.tanh, key=key_mlp))
    y0 = jr.normal(key_y, (GQ_DIM,))
    save_ts = jnp.linspace(0.2, GQ_T1, 10)
    target = jnp.sin(save_ts)[:, None] * jnp.ones(GQ_DIM)
    return field, y0, save_ts, target


def jax_gq_grad(adjoint, save_ts, static):
    controller = dfx.PIDController(rtol=GQ_RTOL, atol=GQ_ATOL)

    @jax.jit
    def grad(params, y0, target):
        def loss(params):
            sol = dfx.diffeqsolve(
                dfx.ODETerm(eqx.combine(params, static)),
                dfx.Dopri5(),
                0.0,
                GQ_T1,
                None,
                y0,
                saveat=dfx.SaveAt(ts=save_ts),
                stepsize_controller=controller,
                adjoint=adjoint,
                max_steps=100_000,
            )
            return jnp.mean((sol.ys - target) ** 2)

        return jax.value_and_grad(loss)(params)

    return grad


def torch_gq_grad(field: GQField, y0, save_ts, target, adjoint, seminorm=False):
    import torch  # pyright: ignore[reportMissingImports]
    import torchdiffeq  # pyright: ignore[reportMissingImports]

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = torch_mlp(field.mlp, torch.nn.Tanh)

        def forward(self, t, y):
            return self.mlp(y) - 0.5 * y

    func = Field().to(torch_dtype())
    params = list(func.parameters())
    ts = torch.cat([torch.zeros(1, dtype=torch_dtype()), torch_tensor(save_ts)])
    y0, target = torch_tensor(y0), torch_tensor(target)
    kwargs: dict = dict(rtol=GQ_RTOL, atol=GQ_ATOL, method="dopri5")
    if seminorm:  # the parameters' adjoint left out of the backward error control
        kwargs["adjoint_options"] = dict(norm="seminorm")
    odeint = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint

    def grad():
        ys = odeint(func, y0, ts, **kwargs)
        loss = torch.mean((ys[1:] - target) ** 2)
        return (loss.detach(), *torch.autograd.grad(loss, params))

    return grad


def gq_peer_reason() -> str:
    if importlib.util.find_spec(GQ_PEER) is None:
        return GQ_PEER_MISSING
    return GQ_PEER_UNBOUND


def gq_timing(cfg, repeats, context):
    rows = []
    for width in cfg["gq"]:
        field, y0, save_ts, target = gq_setup(width)
        problem = (
            f"neural ODE gradient, MLP 2 x {width} (state {GQ_DIM}, Dopri5, rtol "
            f"{GQ_RTOL:g}, atol {GQ_ATOL:g})"
        )
        params, static = eqx.partition(field, eqx.is_array)
        grad = jax_gq_grad(dxe.GaussLegendreAdjoint(), save_ts, static)
        fn, compile_s = compile_timed(grad, params, y0, target)
        fns = {
            OURS_GQ: lambda fn=fn, params=params, y0=y0, target=target: fn(
                params, y0, target
            ),
            TORCHDIFFEQ_ADJ: torch_gq_grad(field, y0, save_ts, target, True),
            TORCHDIFFEQ_SEMI: torch_gq_grad(field, y0, save_ts, target, True, True),
        }
        for peer in (TORCHDIFFEQ_ADJ, TORCHDIFFEQ_SEMI):
            pair = {OURS_GQ: fns[OURS_GQ], peer: fns[peer]}
            rows += pair_rows(
                problem, OURS_GQ, peer, pair, {OURS_GQ: compile_s}, repeats, context
            )
        rows.append(
            dict(
                problem=problem,
                side="peer",
                configuration=GQ_PEER,
                skipped=gq_peer_reason(),
                **context,
            )
        )
    rows.append(
        dict(
            problem="torch_gq_adjoint's own 1-D example",
            side="peer",
            configuration=GQ_PEER,
            skipped=gq_peer_reason(),
            **context,
        )
    )
    return rows


def gq_exactness(cfg, context):
    rows = []
    for width in cfg["gq"]:
        field, y0, save_ts, target = gq_setup(width)
        params, static = eqx.partition(field, eqx.is_array)
        ours = jax_gq_grad(dxe.GaussLegendreAdjoint(), save_ts, static)(
            params, y0, target
        )
        ref = jax_gq_grad(dfx.RecursiveCheckpointAdjoint(), save_ts, static)(
            params, y0, target
        )
        theirs = torch_gq_grad(field, y0, save_ts, target, True)()[1:]
        semi = torch_gq_grad(field, y0, save_ts, target, True, True)()[1:]
        theirs_ref = torch_gq_grad(field, y0, save_ts, target, False)()[1:]
        problem = f"neural ODE gradient, MLP 2 x {width}"
        rows += [
            dict(
                problem=problem,
                side="ours",
                configuration=OURS_GQ,
                reference=OURS_GQ_REF,
                error=relative_error(ref[1], ours[1]),
                **context,
            ),
            dict(
                problem=problem,
                side="peer",
                configuration=TORCHDIFFEQ_ADJ,
                reference=TORCHDIFFEQ_REF,
                error=relative_error(
                    [t.numpy() for t in theirs_ref], [t.numpy() for t in theirs]
                ),
                **context,
            ),
            dict(
                problem=problem,
                side="peer",
                configuration=TORCHDIFFEQ_SEMI,
                reference=TORCHDIFFEQ_REF,
                error=relative_error(
                    [t.numpy() for t in theirs_ref], [t.numpy() for t in semi]
                ),
                **context,
            ),
            dict(
                problem=problem,
                side="peer",
                configuration=GQ_PEER,
                skipped=gq_peer_reason(),
                **context,
            ),
        ]
        for row in rows[-4:]:
            log(**row)
    return rows


# ---------------------------------------------------------------------------------
# Processes


def worker(task: dict) -> dict:
    """One process: one thread setting and one precision."""
    import torch  # pyright: ignore[reportMissingImports]

    if task["threads"] == "all":
        threads = os.cpu_count() or 1
    else:
        threads = int(task["threads"])
    torch.set_num_threads(threads)
    torch.set_default_dtype(torch_dtype())
    cfg, repeats = SIZES[task["mode"]], task["repeats"]
    precision = "float64" if jax.config.read("jax_enable_x64") else "float32"
    context = dict(threads=task["threads"], precision=precision)
    load_before = os.getloadavg()
    timing, exactness = [], []
    start = time.perf_counter()
    if "timing" in task["jobs"]:
        if precision == "float32":
            timing += sde_timing(cfg, repeats, context)
            timing += brownian_timing(cfg, repeats, context)
            timing += mali_timing(cfg, repeats, context)
        else:
            timing += gq_timing(cfg, repeats, context)
    if "exactness" in task["jobs"]:
        exactness += sde_exactness(cfg, context)
        exactness += mali_exactness(cfg, context)
        if precision == "float64":
            exactness += gq_exactness(cfg, context)
    return dict(
        task=task,
        torch_threads=torch.get_num_threads(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        load_before=load_before,
        load_after=os.getloadavg(),
        seconds=time.perf_counter() - start,
        timing=timing,
        exactness=exactness,
    )


def tasks(mode, repeats):
    out = []
    for threads in SIZES[mode]["threads"]:
        for precision in ("float32", "float64"):
            jobs = ["timing"]
            if threads == "all":  # exactness does not depend on the thread count
                jobs.append("exactness")
            out.append(
                dict(
                    mode=mode,
                    repeats=repeats,
                    threads=threads,
                    precision=precision,
                    jobs=jobs,
                )
            )
    return out


def run_task(task) -> dict:
    env = dict(os.environ)
    env["JAX_ENABLE_X64"] = "1" if task["precision"] == "float64" else "0"
    if task["threads"] == "1":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + SINGLE_THREAD_XLA).strip()
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"
    else:
        # torch's OpenMP threads spin while they wait: on a machine that other work
        # also loads, a spinning thread holds the core its partner needs (torchsde's
        # N = 100 step measured 19.5 s spinning, 0.45 s passive, at load 8 on 2
        # cores). XLA's thread pool sleeps while it waits.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "result.json")
        print(
            f"-- process: threads {task['threads']}, {task['precision']}, "
            f"{'+'.join(task['jobs'])}",
            flush=True,
        )
        subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(task), "--result", path],
            check=True,
            env=env,
        )
        with open(path) as f:
            return json.load(f)


# ---------------------------------------------------------------------------------
# Output


def fmt_time(x):
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def problems(cfg) -> list[str]:
    """The problems, as both sides solve them."""
    grid, batch, state, noise, width = cfg["sde"]
    n_bm, shape = cfg["brownian"]
    n_mali, batch_ode, state_ode, width_ode = cfg["mali"]
    steps = " and ".join(str(n) for n in grid)
    widths = ", ".join(str(w) for w in cfg["gq"])
    return [
        "Problems (the same on both sides):",
        "",
        f"- Neural SDE gradient: state {state}, drift and diffusion MLPs of one hidden "
        f"layer {width} wide (SiLU; tanh on the diffusion), general Stratonovich "
        f"noise with {noise} channels, batch {batch} (each sample its own Brownian "
        "path), loss the mean square distance from 0.5 at t = 0.1, 0.2, ..., 1, "
        f"N = {steps} fixed steps on [0, 1], float32 (exactness: float32 and "
        "float64).",
        f"- Brownian increments: {n_bm} consecutive steps of h = 1/{n_bm} on [0, 1], "
        f"shape {tuple(shape)}, from a fresh path each call, float32.",
        f"- MALI neural ODE gradient: state {state_ode}, MLP of two hidden layers "
        f"{width_ode} wide (tanh), batch {batch_ode}, N = {n_mali} fixed steps on "
        "[0, 1], damping 1, loss the mean square of y(1), float32 (exactness: "
        "float32 and float64).",
        f"- Gauss–Legendre adjoint: state {GQ_DIM}, vector field MLP(y) − y/2 with "
        f"two hidden layers of width {widths} (tanh), Dopri5 with rtol {GQ_RTOL:g} "
        f"and atol {GQ_ATOL:g}, loss the mean square distance from sin(t) at 10 "
        f"times on [0.2, {GQ_T1:g}], float64.",
    ]


def markdown(payload) -> str:
    info = payload["machine"]
    peers = ", ".join(
        f"{name} {version}" if version else f"{name} (not installed)"
        for name, version in payload["versions"].items()
    )
    loads = "; ".join(
        f"threads {p['task']['threads']}, {p['task']['precision']}: "
        f"{p['load_before'][0]:.2f} → {p['load_after'][0]:.2f}"
        for p in payload["processes"]
    )
    lines = [
        f"{describe(info)} Peers: {peers}. Threads: `1` = one core each side "
        "(`torch.set_num_threads(1)`; XLA `--xla_cpu_multi_thread_eigen=false "
        f"intra_op_parallelism_threads=1`), `all` = {info['cores']} cores each side "
        "(torch with `OMP_WAIT_POLICY=PASSIVE`, so that its waiting threads do not "
        "spin on a loaded machine), "
        "both sides in the same process, one process per thread setting and "
        f"precision. Median of {payload['repeats']} interleaved pairs after one "
        "warm-up call each (JAX compiled first); `range` is the smallest and largest "
        "per-pair ratio. The same sizes, parameters and initial values on both "
        "sides; Brownian samples differ. One-minute load average before → after "
        f"each process: {loads}.",
        "",
        *problems(payload["sizes"]),
        "",
        "### Time",
        "",
    ]
    table = []
    timing = [r for p in payload["processes"] for r in p["timing"]]
    by_problem: dict = {}
    for r in timing:
        by_problem.setdefault((r["problem"], r["threads"], r["precision"]), []).append(
            r
        )
    for (problem, threads, precision), rs in by_problem.items():
        ours = None
        for r in rs:
            if r.get("skipped"):
                skip = f"{r['configuration']}: {r['skipped']}"
                table.append([problem, threads, precision, "", skip, "", "", "", ""])
                continue
            if r["side"] == "ours":
                ours = r
                continue
            assert ours is not None
            unit = "µs/step" if "Brownian" in problem else "ms"
            compile_s = ours["compile_seconds"]
            table.append(
                [
                    problem,
                    threads,
                    precision,
                    f"`{ours['configuration']}`",
                    f"{r['configuration']}",
                    f"{fmt_time(ours['median'])} {unit}",
                    f"{fmt_time(r['median'])} {unit}",
                    f"{r['peer_over_ours']:.2f}x ({r['pair_ratio_min']:.2f}–"
                    f"{r['pair_ratio_max']:.2f})",
                    f"{compile_s:.1f} / {ours['warmup_seconds']:.2f} / "
                    f"{r['warmup_seconds']:.2f}"
                    if compile_s is not None
                    else "",
                ]
            )
    header = [
        "problem",
        "threads",
        "dtype",
        "ours",
        "peer",
        "ours:",
        "peer:",
        "peer / ours (range):",
        "compile ours / warm-up ours / warm-up peer (s):",
    ]
    lines.append(markdown_table(header, table))
    lines += [
        "### Gradient exactness against the same library's backpropagation",
        "",
        "Max over parameters of max|g − g_backprop| / max|g_backprop|, the same "
        "Brownian sample on both sides of each comparison.",
        "",
    ]
    table = []
    exact = [r for p in payload["processes"] for r in p["exactness"]]
    for r in exact:
        table.append(
            [
                r["problem"],
                r["precision"],
                f"`{r['configuration']}`"
                if r["side"] == "ours"
                else r["configuration"],
                r.get("reference", ""),
                r["skipped"] if r.get("skipped") else f"{r['error']:.1e}",
            ]
        )
    header = ["problem", "dtype", "gradient", "against", "relative error:"]
    lines.append(markdown_table(header, table))
    return "\n".join(lines)


def main():
    def extra(parser):
        parser.add_argument("--worker", help=argparse_hidden())
        parser.add_argument("--result", help=argparse_hidden())

    args = parse_args(__doc__, repeats=5, extra=extra)
    if args.worker:
        result = worker(json.loads(args.worker))
        with open(args.result, "w") as f:
            json.dump(result, f)
        return
    if not torch_available():
        sys.exit(
            "peers: torch is not importable; install the peers with "
            '`pip install -e ".[peers]"`'
        )
    info = machine()
    print(f"peers: {versions()}", flush=True)
    processes = [run_task(task) for task in tasks(args.mode, args.repeats)]
    payload = dict(
        machine=info,
        versions=versions(),
        sizes=SIZES[args.mode],
        processes=processes,
    )
    payload["repeats"] = args.repeats
    save("peers", args, payload, markdown(payload))


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


# The runner's report (`python -m benchmarks`): this section's title, its rows
# in the headline table, and its chart.
TITLE = "Peers: the PyTorch libraries users would pick instead"


def headline(data) -> list[dict]:
    # Its own table (README, results/peers.md): the headline compares with diffrax.
    return []


def chart(data, path) -> None:
    rows = [
        r
        for p in data["processes"]
        for r in p["timing"]
        if not r.get("skipped") and r["side"] == "peer"
    ]

    def peer_label(r):
        peer = r["configuration"].split(" (")[0]
        peer += ", seminorm" if "seminorm" in r["configuration"] else ""
        problem = r["problem"].split(" (")[0].split(" consecutive")[0]
        return f"{peer}: {problem.split(', ')[-1]}, threads {r['threads']}"

    labels = [peer_label(r) for r in rows]
    series = {"peer's time / ours": [r["peer_over_ours"] for r in rows]}
    title = "The PyTorch peers: their time / ours"
    bar_chart(path, title, labels, series, "x (above 1: ours faster)", log=True)


if __name__ == "__main__":
    main()
