import numbers
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax import AbstractAdjoint, RESULTS, SubSaveAt

from .._diffrax_internals import (
    is_unsafe_sde,
    loop_and_record_steps,
    only_transpose_ys,
    SaveState,
    unvmap_any,
)
from .._misc import materialise_cotangent, tree_add, zeros_cotangent
from .._solver.base import AbstractReversibleSolver
from .._solver.reversible_heun import ReversibleHeun
from .common import (
    check_no_dense,
    check_no_event,
    closure_convert_terms,
    is_none,
    is_subsaveat,
    nan_if_failed,
    nondifferentiable_times,
)


def _is_save_state(x: Any) -> bool:
    return isinstance(x, SaveState)


class ReversibleAdjoint(AbstractAdjoint):
    """Backpropagate through `diffrax.diffeqsolve` by running an algebraically
    reversible solver backwards.

    The forward pass is an ordinary solve that keeps only the final state and the
    times of the accepted steps. The backward pass walks the steps in reverse: at each
    step it reconstructs the previous state with the solver's exact inverse
    (`backward_step`) and pulls the cotangents back through the forward step there.
    The gradient is that of the discretised solve (the same as
    `diffrax.RecursiveCheckpointAdjoint` with the same solver, up to floating
    point), at about the cost of storing every step, in memory that does not grow with
    the number of steps (apart from one buffer of `max_steps` step times).

    Requires a reversible solver: [`diffrax_extras.ReversibleHeun`][], or any
    [`diffrax_extras.AbstractReversibleSolver`][]. `diffrax.ReversibleHeun()` is
    accepted and replaced by `diffrax_extras.ReversibleHeun()`, which gives the same
    numbers and stays reversible across `jump_ts`.

    Supports ODEs, CDEs and SDEs (with a Brownian path that is a pure function of the
    query, such as [`diffrax_extras.BrownianInterval`][] or
    `diffrax.VirtualBrownianTree`), any step size controller
    (including `jump_ts` and `step_ts`), `SaveAt(t0=..., t1=..., ts=..., steps=...,
    fn=...)` and `SaveAt(subs=...)`; gradients with respect to `y0`, `args` and
    everything differentiable inside `terms`.

    Running a solver backwards can be unstable: with a coupling or damping well below
    1, or over many float32 steps, the reconstructed states drift from the true ones
    and the gradient along them is wrong. The backward pass therefore ends by
    comparing the reconstructed initial state with `y0`, and raises (at run time,
    with `equinox.error_if`) if they differ by more than `reconstruction_tol`. A
    failed forward solve (`throw=False`) gives NaN gradients instead.

    Not supported (each raises an error at trace time): events, `SaveAt(dense=True)`,
    `max_steps=None`, `diffrax.UnsafeBrownianPath`, and gradients with respect to
    `t0`, `t1` or `SaveAt(ts=...)`.

    ??? cite "References"

        ```bibtex
        @article{kidger2021efficient,
            author={Kidger, Patrick and Foster, James and Li, Xuechen and Lyons, Terry},
            title={{E}fficient and {A}ccurate {G}radients for {N}eural {SDE}s},
            year={2021},
            journal={Advances in Neural Information Processing Systems}
        }

        @article{mccallum2024efficient,
            title={Efficient, Accurate and Stable Gradients for Neural ODEs},
            author={McCallum, Sam and Foster, James},
            journal={arXiv preprint arXiv:2410.11648},
            year={2024}
        }
        ```
    """

    reconstruction_tol: float | None = 1e-3

    def __check_init__(self):
        tol = self.reconstruction_tol
        if tol is not None and not (isinstance(tol, numbers.Real) and tol > 0):
            raise ValueError(
                "`reconstruction_tol` must be a positive number (the largest "
                "relative error allowed in the rebuilt initial state, e.g. `1e-3`) "
                f"or `None` to skip the check, but got {tol!r}."
            )

    def loop(
        self,
        *,
        args,
        terms,
        solver,
        stepsize_controller,
        event,
        saveat,
        t0,
        t1,
        dt0,
        max_steps,
        throw,
        init_state,
        passed_solver_state,
        passed_controller_state,
        progress_meter,
    ):
        del throw, passed_solver_state, passed_controller_state
        if type(solver) is diffrax.ReversibleHeun:
            # Same numbers, same solver state; ours stays exact across jumps.
            solver = ReversibleHeun()
        if not isinstance(solver, AbstractReversibleSolver):
            raise ValueError(
                "`ReversibleAdjoint()` needs an algebraically reversible solver, but "
                f"got `solver={type(solver).__name__}(...)`. Use "
                "`solver=diffrax_extras.ReversibleHeun()`, or make an explicit solver "
                "reversible with `solver=diffrax_extras.Reversible(solver)`."
            )
        check_no_event(
            "ReversibleAdjoint",
            event,
            "the time of the event is not a step of the reversible solve.",
        )
        check_no_dense(
            "ReversibleAdjoint",
            saveat,
            "storing the dense solution would cost the memory that this adjoint saves.",
        )
        if max_steps is None:
            raise ValueError(
                "`ReversibleAdjoint()` needs `diffeqsolve(..., max_steps=...)` to be "
                "an integer, not `None`: the times of the accepted steps are kept in "
                "a buffer of `max_steps` entries for the backward pass."
            )
        if is_unsafe_sde(terms):
            raise ValueError(
                "`ReversibleAdjoint()` does not support `diffrax.UnsafeBrownianPath`: "
                "the backward pass queries the Brownian path again, so it must return "
                "the same increment for the same interval. Use "
                "`diffrax_extras.BrownianInterval` (or `diffrax.VirtualBrownianTree`)."
            )

        t0, t1, saveat = nondifferentiable_times("ReversibleAdjoint", t0, t1, saveat)
        # diffrax wraps each `SubSaveAt.fn` in a closure over traced values (the time
        # direction); converting makes those explicit arrays, so that the backward
        # pass, traced separately, can call `fn` too.
        saveat = jtu.tree_map(
            lambda sub: _closure_convert_fn(sub, t0, init_state.y, args),
            saveat,
            is_leaf=is_subsaveat,
        )
        terms = closure_convert_terms(terms, t0, init_state.y, args)
        # Step sizes are not differentiated through (diffrax's own controllers
        # `stop_gradient` them too), so neither is the controller's state.
        init_state = eqx.tree_at(
            lambda s: s.controller_state,
            init_state,
            replace_fn=lax.stop_gradient,
            is_leaf=is_none,
        )
        y0 = init_state.y
        solver_state0 = init_state.solver_state
        init_state = eqx.tree_at(
            lambda s: (s.y, s.solver_state),
            init_state,
            (None, None),
            is_leaf=is_none,
        )
        final_state, aux_stats = _loop_reversible(
            (y0, solver_state0, args, terms),
            self=self,
            solver=solver,
            stepsize_controller=stepsize_controller,
            saveat=saveat,
            t0=t0,
            t1=t1,
            dt0=dt0,
            max_steps=max_steps,
            init_state=init_state,
            progress_meter=progress_meter,
        )
        final_state = only_transpose_ys(final_state)
        return final_state, aux_stats


ReversibleAdjoint.__init__.__doc__ = """**Arguments:**

- `reconstruction_tol`: after the backward pass, the reconstructed initial state is
    compared with the true one; if they differ by more than `reconstruction_tol`
    times `max(1, max|y0|, max|y1|)` (on any leaf), running the solver backwards was
    unstable (a coupling or damping far below 1, or a long float32 solve), the
    gradient would be wrong, and an error is raised instead. `None` skips the check.
"""


def _closure_convert_fn(sub, t, y, args):
    if not is_subsaveat(sub):
        return sub
    fn = eqx.filter_closure_convert(sub.fn, t, y, args)
    return eqx.tree_at(lambda s: s.fn, sub, fn)


def _fill_state(init_state, y0, solver_state0):
    return eqx.tree_at(
        lambda s: (s.y, s.solver_state),
        init_state,
        (y0, solver_state0),
        is_leaf=is_none,
    )


@eqx.filter_custom_vjp
def _loop_reversible(y0__state0__args__terms, *, self, init_state, **kwargs):
    final_state, aux_stats, _ = _forward(
        y0__state0__args__terms, self, init_state, kwargs
    )
    return final_state, aux_stats


def _forward(y0__state0__args__terms, self, init_state, kwargs):
    y0, solver_state0, args, terms = y0__state0__args__terms
    return loop_and_record_steps(
        self._loop,
        args=args,
        terms=terms,
        init_state=_fill_state(init_state, y0, solver_state0),
        event=None,
        **kwargs,
    )


@_loop_reversible.def_fwd
def _loop_reversible_fwd(
    perturbed, y0__state0__args__terms, *, self, init_state, **kwargs
):
    del perturbed
    final_state, aux_stats, record = _forward(
        y0__state0__args__terms, self, init_state, kwargs
    )
    residuals = (
        final_state.y,
        final_state.solver_state,
        final_state.tprev,
        final_state.result,
        record,
    )
    return (final_state, aux_stats), residuals


@_loop_reversible.def_bwd
def _loop_reversible_bwd(
    residuals,
    grad_final_state__aux_stats,
    perturbed,
    y0__state0__args__terms,
    *,
    self,
    solver,
    stepsize_controller,
    saveat,
    t0,
    t1,
    dt0,
    max_steps,
    init_state,
    progress_meter,
):
    del perturbed, stepsize_controller, t1, dt0, init_state, progress_meter
    y_final, solver_state_final, tfinal, result, record = residuals
    grad_final_state, _ = grad_final_state__aux_stats
    y0, _, args, terms = y0__state0__args__terms
    num_steps = record.num_steps

    subs = jtu.tree_leaves(saveat.subs, is_leaf=is_subsaveat)
    grad_save_states = jtu.tree_leaves(
        grad_final_state.save_state, is_leaf=_is_save_state
    )
    saves = [
        _SaveCotangent(sub, grad.ys, record)
        for sub, grad in zip(subs, grad_save_states, strict=True)
        if _is_save_state(grad)
    ]

    ct_y = zeros_cotangent(y_final)
    ct_args = zeros_cotangent(args)
    for save in saves:
        ct_y, ct_args = save.pull_back_t1(ct_y, ct_args, t0, tfinal, y_final, args)

    def cond_fun(carry):
        i, *_ = carry
        return i >= 0

    def body_fun(carry):
        i, y1, solver_state1, ct_y1, ct_state1, ct_args, ct_terms = carry
        tprev = record.tprev[i]
        tnext = record.tnext[i]
        made_jump0 = record.made_jump_at(i)
        is_last = i + 1 >= num_steps
        made_jump1 = record.made_jump_at(i + 1)
        if made_jump1 is not False:
            made_jump1 = jnp.where(is_last, False, made_jump1)
        tprev_next = jnp.where(is_last, tfinal, record.tprev[i + 1])
        for save in saves:
            ct_y1, ct_args = save.pull_back_step(
                i, ct_y1, ct_args, tprev_next, y1, args
            )
        y0, dense_info, solver_state0, _, pullback = solver.backward_step_vjp(
            terms, tprev, tnext, y1, args, solver_state1, made_jump0, made_jump1
        )
        ct_dense = zeros_cotangent(dense_info)
        for save in saves:
            ct_dense, ct_args = save.pull_back_ts(
                i, ct_dense, ct_args, solver, tprev, tnext, dense_info, args
            )
        ct_y0, ct_state0, ct_args_step, ct_terms_step = pullback(
            (ct_y1, ct_dense, ct_state1)
        )
        ct_args = tree_add(ct_args, ct_args_step)
        ct_terms = tree_add(ct_terms, ct_terms_step)
        return i - 1, y0, solver_state0, ct_y0, ct_state0, ct_args, ct_terms

    carry = (
        num_steps - 1,
        y_final,
        solver_state_final,
        ct_y,
        zeros_cotangent(solver_state_final),
        ct_args,
        zeros_cotangent(terms),
    )
    _, y0_rebuilt, _, ct_y0, ct_state0, ct_args, ct_terms = lax.while_loop(
        cond_fun, body_fun, carry
    )
    for save in saves:
        ct_y0, ct_args = save.pull_back_t0(ct_y0, ct_args, t0, y0, args)
    cotangents = nan_if_failed(result, (ct_y0, ct_state0, ct_args, ct_terms))
    if self.reconstruction_tol is None:
        return cotangents
    return _check_reconstruction(
        cotangents, y0, y0_rebuilt, y_final, result, self.reconstruction_tol
    )


def _check_reconstruction(cotangents, y0, y0_rebuilt, y_final, result, tol):
    """Raises, at run time, if the backward pass did not rebuild `y0`: the states it
    passed through on the way were then wrong too, and so is the gradient."""

    def leaf_failed(a, b, c):
        if not eqx.is_inexact_array(a) or a.size == 0:
            return jnp.array(False)
        scale = jnp.maximum(1, jnp.maximum(jnp.max(jnp.abs(a)), jnp.max(jnp.abs(c))))
        # Written so that NaN counts as a failure.
        return ~(jnp.max(jnp.abs(a - b)) <= tol * scale)

    failed = jtu.tree_reduce(
        jnp.logical_or,
        jtu.tree_map(leaf_failed, y0, y0_rebuilt, y_final),
        jnp.array(False),
    )
    failed = jnp.logical_and(failed, result == RESULTS.successful)
    return eqx.error_if(
        cotangents,
        failed,
        "`ReversibleAdjoint` could not reconstruct the initial state on the backward "
        "pass (it differs from `y0` by more than `reconstruction_tol`): running the "
        "solver backwards is unstable here, so the gradient would be wrong. Use a "
        "coupling closer to 1 in `Reversible(...)`, `damping=1.0` in "
        "`AsynchronousLeapfrog`, float64, or fewer steps; or use "
        "`adjoint=diffrax.RecursiveCheckpointAdjoint()`.",
    )


def _fn_vjp(fn, t, y, args, ct):
    """Cotangents of `(y, args)` through `fn(t, y, args)`."""
    out, vjp_fn = eqx.filter_vjp(lambda _y, _args: fn(t, _y, _args), y, args)
    return vjp_fn(materialise_cotangent(out, ct))


class _SaveCotangent(eqx.Module):
    """Pulls the cotangents of one `SubSaveAt`'s saved outputs back into the solve.

    Replays where diffrax's loop wrote each output: the `t0` entry first, then per
    accepted step the `ts` that the step reached followed by the every-`steps`-th
    value, then the `t1` entry.
    """

    sub: SubSaveAt
    ct_ys: Any
    record: Any

    def _ct_at(self, index):
        return jtu.tree_map(lambda c: c[index], self.ct_ys)

    @property
    def _t0_offset(self):
        return 1 if self.sub.t0 else 0

    def _num_ts_reached(self, t):
        # The forward loop saves `ts[k]` in the first accepted step whose end is at
        # or after it, so the number of outputs of `ts` written up to a step is this.
        ts = self.sub.ts
        assert ts is not None
        return jnp.searchsorted(ts, t, side="right").astype(jnp.int32)

    def _steps_before(self, i):
        return 0 if self.sub.steps == 0 else i // self.sub.steps

    def pull_back_t0(self, ct_y0, ct_args, t0, y0, args):
        if not self.sub.t0:
            return ct_y0, ct_args
        ct_y, ct_a = _fn_vjp(self.sub.fn, t0, y0, args, self._ct_at(0))
        return tree_add(ct_y0, ct_y), tree_add(ct_args, ct_a)

    def pull_back_t1(self, ct_y, ct_args, t0, tfinal, y_final, args):
        sub = self.sub
        num_steps = self.record.num_steps
        trivial = t0 == tfinal
        if sub.ts is not None:
            # A solve with t0 == t1 takes no step and saves y0 at every `ts`.
            num_ts = len(sub.ts)

            def _trivial(ct_y, ct_args):
                start = self._t0_offset
                ct_ts = jtu.tree_map(lambda c: c[start : start + num_ts], self.ct_ys)
                _ct_y, _ct_a = jax.vmap(
                    lambda ct: _fn_vjp(sub.fn, t0, y_final, args, ct)
                )(ct_ts)
                _sum = lambda x: None if x is None else jnp.sum(x, axis=0)
                _ct_y = jtu.tree_map(_sum, _ct_y, is_leaf=is_none)
                _ct_a = jtu.tree_map(_sum, _ct_a, is_leaf=is_none)
                return tree_add(ct_y, _ct_y), tree_add(ct_args, _ct_a)

            ct_y, ct_args = lax.cond(
                unvmap_any(trivial),
                lambda c: lax.cond(trivial, _trivial, lambda *a: a, *c),
                lambda c: c,
                (ct_y, ct_args),
            )
        if sub.t1:
            if sub.steps == 0:
                pred = True
            elif sub.steps == 1:
                pred = False
            else:
                pred = num_steps % sub.steps != 0
            if pred is not False:
                num_ts = 0
                if sub.ts is not None:
                    num_ts = jnp.where(
                        trivial, len(sub.ts), self._num_ts_reached(tfinal)
                    )
                index = self._t0_offset + num_ts + self._steps_before(num_steps)
                ct = jtu.tree_map(lambda c: jnp.where(pred, c, 0), self._ct_at(index))
                _ct_y, _ct_a = _fn_vjp(sub.fn, tfinal, y_final, args, ct)
                ct_y, ct_args = tree_add(ct_y, _ct_y), tree_add(ct_args, _ct_a)
        return ct_y, ct_args

    def pull_back_step(self, i, ct_y1, ct_args, tprev_next, y1, args):
        """The every-`steps`-th output, saved at the end of accepted step `i`."""
        sub = self.sub
        if sub.steps == 0:
            return ct_y1, ct_args
        saved = (i + 1) % sub.steps == 0
        num_ts = 0 if sub.ts is None else self._num_ts_reached(self.record.tnext[i])
        index = self._t0_offset + num_ts + (i + 1) // sub.steps - 1
        index = jnp.maximum(index, 0)
        ct = jtu.tree_map(lambda c: jnp.where(saved, c, 0), self._ct_at(index))
        ct_y, ct_a = _fn_vjp(sub.fn, tprev_next, y1, args, ct)
        return tree_add(ct_y1, ct_y), tree_add(ct_args, ct_a)

    def pull_back_ts(
        self, i, ct_dense, ct_args, solver, tprev, tnext, dense_info, args
    ):
        """The outputs at `ts` that accepted step `i` reached, by its interpolation."""
        sub = self.sub
        ts = sub.ts
        if ts is None:
            return ct_dense, ct_args
        tnext_before = jnp.where(
            i > 0, self.record.tnext[jnp.maximum(i - 1, 0)], -jnp.inf
        )
        k_start = jnp.where(i > 0, self._num_ts_reached(tnext_before), 0)
        k_end = self._num_ts_reached(tnext)
        offset = self._t0_offset + self._steps_before(i)

        def _save(_dense_info, _args, t):
            interpolation = solver.interpolation_cls(t0=tprev, t1=tnext, **_dense_info)
            return sub.fn(t, interpolation.evaluate(t), _args)

        def cond_fun(carry):
            k, _, _ = carry
            return k < k_end

        def body_fun(carry):
            k, _ct_dense, _ct_args = carry
            t = ts[k]
            out, vjp_fn = eqx.filter_vjp(lambda d, a: _save(d, a, t), dense_info, args)
            ct_d, ct_a = vjp_fn(materialise_cotangent(out, self._ct_at(offset + k)))
            return k + 1, tree_add(_ct_dense, ct_d), tree_add(_ct_args, ct_a)

        _, ct_dense, ct_args = lax.while_loop(
            cond_fun, body_fun, (k_start, ct_dense, ct_args)
        )
        return ct_dense, ct_args
