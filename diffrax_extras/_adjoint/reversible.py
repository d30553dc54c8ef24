import functools as ft
import numbers
from typing import Any

import diffrax
import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax import AbstractAdjoint, AbstractWrappedSolver, RESULTS

from .._diffrax_internals import is_unsafe_sde, only_transpose_ys, SaveState
from .._misc import is_none, materialise_cotangent, tree_add, zeros_cotangent
from .._solver.base import AbstractReversibleSolver
from .._solver.reversible_heun import ReversibleHeun
from .common import (
    check_no_dense,
    check_no_event,
    closure_convert_saveat,
    controller_state_not_differentiated,
    is_subsaveat,
    nan_if_failed,
    nan_or_raise,
    prepare_differentiated_inputs,
    put_back,
    take_out,
)
from .first_order import (
    not_differentiated_again,
    not_transposed_again,
    reverse_mode_only,
)
from .reconstruction import (
    FLOOR_POWER,
    MIN_ROUNDINGS,
    not_finite,
    reconstruction_error,
    reconstruction_scale,
    RECONSTRUCTION_TOL,
    STATE_FLOOR_POWER,
)
from .saved_outputs import SavedOutputs
from .step_record import loop_and_record_steps, max_jumps


_NAME = "ReversibleAdjoint"
# The parts of diffrax's initial loop state that carry gradients into the solve.
_DIFFERENTIATED = lambda s: (s.y, s.solver_state)  # noqa: E731


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

    Everything the solve closes over is differentiated as with
    `diffrax.RecursiveCheckpointAdjoint`: parameters captured by a vector field, by a
    `SaveAt(fn=...)` or by a callable control. A solve that continues from
    `sol.solver_state` of an earlier one (training on long sequences in chunks) gets
    the cotangent of that solver state too.

    Running a solver backwards can be unstable: with a coupling or damping well below
    1, or over many float32 steps, the reconstructed states drift from the true ones
    and the gradient along them is wrong. The backward pass therefore ends by
    comparing the reconstructed initial state and solver state with the true ones,
    element by element, and if they differ by more than `reconstruction_tol` raises
    (at run time, with `equinox.error_if`), or with `diffeqsolve(..., throw=False)`
    returns NaN gradients. A forward solve that failed or diverged (a state that is
    not finite) gives NaN gradients too, or with `throw=True` for a diverged one, an
    error.

    First derivatives in reverse mode only (`jax.grad`, `jax.vjp`, `jax.jacrev`):
    forward mode and higher derivatives (`jax.jvp`, `jax.jacfwd`, `jax.hessian`, a
    `jax.grad` of a `jax.grad`) raise an error that points to
    `diffrax.ForwardMode` and `diffrax.DirectAdjoint`.

    Not supported (each raises an error at trace time): events, `SaveAt(dense=True)`,
    `max_steps=None`, `diffrax.UnsafeBrownianPath`, and gradients with respect to
    `t0`, `t1`, `dt0`, `SaveAt(ts=...)`, the step size controller (`jump_ts`,
    tolerances) or the solver's own parameters.

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

    reconstruction_tol: float | None = RECONSTRUCTION_TOL

    def __check_init__(self):
        tol = self.reconstruction_tol
        if tol is not None and not (isinstance(tol, numbers.Real) and tol > 0):
            raise ValueError(
                "`reconstruction_tol` must be a positive number (the largest "
                "relative error allowed in the rebuilt initial state, e.g. "
                f"`{RECONSTRUCTION_TOL}`) or `None` to skip the check, but got "
                f"{tol!r}."
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
        del passed_controller_state
        solver = _reversible_solver(solver)
        check_no_event(
            _NAME, event, "the time of the event is not a step of the reversible solve."
        )
        check_no_dense(
            _NAME,
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

        (t0, t1, saveat, solver, stepsize_controller, dt0, init_state, terms) = (
            prepare_differentiated_inputs(
                _NAME,
                t0=t0,
                t1=t1,
                saveat=saveat,
                solver=solver,
                stepsize_controller=stepsize_controller,
                dt0=dt0,
                init_state=init_state,
                terms=terms,
                args=args,
            )
        )
        saveat = closure_convert_saveat(saveat, t0, init_state.y, args)
        (y0, solver_state0), init_state = take_out(init_state, _DIFFERENTIATED)
        if not passed_solver_state:
            # diffrax computed this state with `solver.init` before the solve; had
            # its derivative flowed from there, JAX would keep that evaluation's
            # residuals (for a neural vector field, its activations) alive
            # throughout the solve. The backward pass differentiates `solver.init`
            # again at the end instead.
            solver_state0 = lax.stop_gradient(solver_state0)
        inputs = reverse_mode_only((y0, solver_state0, args, terms, saveat), _NAME)
        final_state, aux_stats = _loop_reversible(
            inputs,
            self=self,
            solver=solver,
            stepsize_controller=stepsize_controller,
            t0=t0,
            t1=t1,
            dt0=dt0,
            max_steps=max_steps,
            max_jumps=max_jumps(stepsize_controller, max_steps),
            throw=throw,
            init_state=init_state,
            initialised_here=not passed_solver_state,
            progress_meter=progress_meter,
        )
        # The saved outputs and, for a solve continued from `sol.solver_state`, the
        # final solver state carry cotangents into the backward pass.
        solver_state = final_state.solver_state
        final_state = only_transpose_ys(final_state)
        final_state = eqx.tree_at(
            lambda s: s.solver_state, final_state, solver_state, is_leaf=is_none
        )
        return controller_state_not_differentiated(final_state), aux_stats


ReversibleAdjoint.__init__.__doc__ = f"""**Arguments:**

- `reconstruction_tol`: after the backward pass, the reconstructed initial state `y0`
    and solver state are compared with the true ones; if any element of `y0` differs
    by more than `reconstruction_tol` times its size (the larger of its sizes at the
    start and the end of the solve, floored at `eps**{FLOOR_POWER:.3g}` times the
    largest in its array, for the dtype's `eps`), or any element of the solver state
    by more than `reconstruction_tol` times the largest in its array, running the
    solver backwards was unstable and the gradient would be wrong, so an error is
    raised (NaN gradients with `diffeqsolve(..., throw=False)`). The check bounds the
    drift of the reconstruction, not the gradient's error: a gradient that is very
    sensitive to the path (a long float32 solve of a nearly chaotic system, say) can
    be wrong with a well rebuilt state, so check such a gradient once against
    `diffrax.RecursiveCheckpointAdjoint`.
    The default `{RECONSTRUCTION_TOL}` was chosen from the measured cases in the
    documentation's reliability page. No element is held to less than
    `{MIN_ROUNDINGS} * eps` of its dtype (in float16 and bfloat16 the default is below
    one rounding). `None` skips the check.
"""


def _reversible_solver(solver):
    """The solver to run, checked to be reversible."""
    if type(solver) is diffrax.ReversibleHeun:
        # Same numbers, same solver state; ours stays exact across jumps.
        return ReversibleHeun()
    # By type, not `isinstance`: diffrax forwards `isinstance` checks through
    # wrappers such as `diffrax.HalfSolver`, which are not reversible.
    if issubclass(type(solver), AbstractReversibleSolver):
        return solver
    name = type(solver).__name__
    if isinstance(solver, AbstractWrappedSolver):
        inner = type(solver.solver).__name__
        raise ValueError(
            f"`ReversibleAdjoint()` needs an algebraically reversible solver, but "
            f"`solver={name}({inner}(...))` is not one: `{name}` changes how each "
            "step is taken, and has no inverse step. Pass the reversible solver "
            f"itself, e.g. `solver={inner}()`."
        )
    raise ValueError(
        "`ReversibleAdjoint()` needs an algebraically reversible solver, but got "
        f"`solver={name}(...)`. Use `solver=diffrax_extras.ReversibleHeun()`, or make "
        "an explicit solver reversible with `solver=diffrax_extras.Reversible(solver)`."
    )


@eqx.filter_custom_vjp
def _loop_reversible(
    inputs, *, self, init_state, max_steps, max_jumps, throw, initialised_here, **kwargs
):
    del throw, initialised_here
    final_state, aux_stats, _ = _forward(
        inputs, self, init_state, max_steps, max_jumps, kwargs
    )
    return final_state, aux_stats


def _forward(inputs, self, init_state, max_steps, max_jumps, kwargs):
    y0, solver_state0, args, terms, saveat = inputs
    init_state = put_back(init_state, _DIFFERENTIATED, (y0, solver_state0))
    return loop_and_record_steps(
        self._loop,
        args=args,
        terms=terms,
        saveat=saveat,
        init_state=init_state,
        event=None,
        max_steps=max_steps,
        max_jumps=max_jumps,
        **kwargs,
    )


@_loop_reversible.def_fwd
def _loop_reversible_fwd(
    perturbed,
    inputs,
    *,
    self,
    init_state,
    max_steps,
    max_jumps,
    throw,
    initialised_here,
    **kwargs,
):
    del perturbed, throw, initialised_here
    final_state, aux_stats, record = _forward(
        inputs, self, init_state, max_steps, max_jumps, kwargs
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
    inputs,
    *,
    self,
    solver,
    throw,
    t0,
    init_state,
    initialised_here,
    **kwargs,
):
    del perturbed, kwargs
    residuals, inputs = not_differentiated_again((residuals, inputs), _NAME)
    y_final, state_final, tfinal, result, record = residuals
    grad_final_state, _ = grad_final_state__aux_stats
    y0, state0, args, terms, saveat = inputs

    subs = jtu.tree_leaves(saveat.subs, is_leaf=is_subsaveat)
    grad_save_states = jtu.tree_leaves(
        grad_final_state.save_state, is_leaf=_is_save_state
    )
    saves = [
        SavedOutputs(sub, grad.ys, record)
        for sub, grad in zip(subs, grad_save_states, strict=True)
        if _is_save_state(grad)
    ]
    ct_fns = [zeros_cotangent(save.sub.fn) for save in saves]

    # The outputs saved at the end of the solve, and a continued solve's cotangent
    # of the final solver state.
    ct_y = zeros_cotangent(y_final)
    ct_args = zeros_cotangent(args)
    for k, save in enumerate(saves):
        cts = (ct_y, ct_args, ct_fns[k])
        cts = save.pull_back_trivial(cts, t0, tfinal, y_final, args)
        ct_y, ct_args, ct_fns[k] = save.pull_back_t1(cts, t0, tfinal, y_final, args)
    ct_state = materialise_cotangent(state_final, grad_final_state.solver_state)
    # Everything the checks below need of the final state, taken now so that the
    # backward loop can update that state in place.
    diverged = not_finite((y_final, state_final))
    kept = solver.reconstructed_state
    scales = (
        reconstruction_scale(y0, y_final),
        reconstruction_scale(kept(state0), kept(state_final), STATE_FLOOR_POWER),
    )

    carry = _BackwardCarry(
        i=record.num_steps - 1,
        jumps=record.num_jumps(),
        tprev_next=tfinal,
        made_jump_next=jnp.array(False),
        y=y_final,
        solver_state=state_final,
        ct_y=ct_y,
        ct_state=ct_state,
        ct_args=ct_args,
        ct_terms=zeros_cotangent(terms),
        ct_fns=ct_fns,
    )
    step = ft.partial(_backward_step, solver, record, saves, args, terms)
    carry = lax.while_loop(lambda c: c.i >= 0, step, carry)

    ct_y0, ct_args, ct_fns = carry.ct_y, carry.ct_args, carry.ct_fns
    for k, save in enumerate(saves):
        ct_y0, ct_args, ct_fns[k] = save.pull_back_t0(
            (ct_y0, ct_args, ct_fns[k]), t0, y0, args
        )
    ct_saveat = _saveat_cotangent(saveat, saves, ct_fns)
    ct_state0, ct_terms = carry.ct_state, carry.ct_terms
    if initialised_here:
        ct_y0, ct_args, ct_terms = _pull_back_init(
            solver,
            init_state,
            (carry.y, state0, args, terms),
            ct_state0,
            (ct_y0, ct_args, ct_terms),
        )
        ct_state0 = zeros_cotangent(state0)
    cotangents = (ct_y0, ct_state0, ct_args, ct_terms, ct_saveat)

    cotangents = nan_if_failed(result, cotangents)
    cotangents = nan_or_raise(
        cotangents,
        diverged,
        throw,
        "The forward solve diverged: its final state is not finite (NaN or inf), "
        "so neither is its gradient. (diffrax reports such a solve as successful.) "
        "Use smaller steps, an adaptive step size controller, or look for the "
        "overflow in the vector field.",
    )
    if self.reconstruction_tol is not None:
        failed = _reconstruction_failed(
            (y0, kept(state0)),
            (carry.y, kept(carry.solver_state)),
            scales,
            self.reconstruction_tol,
            record.made_jump_at(0),
        )
        healthy = (result == RESULTS.successful) & ~diverged
        cotangents = nan_or_raise(
            cotangents,
            failed & healthy,
            throw,
            "`ReversibleAdjoint` could not reconstruct the initial state on the "
            "backward pass (the rebuilt `y0` or solver state differs from the true one "
            "by more than `reconstruction_tol`): running the solver backwards is "
            "unstable here, so the gradient would be wrong. "
            + solver.unstable_reconstruction_advice(),
        )
    # Linear in the cotangents it was given, so forward mode may differentiate it
    # there (with respect to an input of the loss alone); reverse mode may not.
    return not_transposed_again(cotangents, _NAME)


def _pull_back_init(solver, init_state, primals, ct_state0, cts):
    """Adds to the cotangents `cts` of `(y0, args, terms)` those that reach them
    through the initial solver state, which diffrax computed with `solver.init`;
    `primals` is `(y0, state0, args, terms)`.

    Differentiated at `y0` as rebuilt by the backward loop, as every step was at its
    rebuilt state (`state0` gives only the structure): an evaluation at the true
    `y0` would be merged by XLA with the forward one, whose residuals would then stay
    alive throughout the solve.
    """
    y0, state0, args, terms = primals
    tprev, tnext = init_state.tprev, init_state.tnext

    def init(_y0, _args, _terms):
        return solver.init(_terms, tprev, tnext, _y0, _args)

    _, init_vjp = eqx.filter_vjp(init, y0, args, terms)
    return tree_add(cts, init_vjp(materialise_cotangent(state0, ct_state0)))


def _reconstruction_failed(true, rebuilt, scales, tol, made_jump0):
    (y0, state0), (y_rebuilt, state_rebuilt), (y_scale, state_scale) = (
        true,
        rebuilt,
        scales,
    )
    y_error = reconstruction_error(y0, y_rebuilt, y_scale, tol)
    state_error = reconstruction_error(state0, state_rebuilt, state_scale, tol)
    # After a jump at t0 the first step refreshed the parts of the solver state that
    # the jump made stale; the rebuilt state holds the refreshed values.
    state_error = jnp.where(made_jump0, 0, state_error)
    # Written so that NaN counts as a failure.
    return ~(jnp.maximum(y_error, state_error) <= tol)


class _BackwardCarry(eqx.Module):
    """The state of the backward loop, about to invert accepted step `i`."""

    i: Any
    # The number of jumps into steps 1, ..., i.
    jumps: Any
    # Where step i + 1 started (the end of the solve for the last step), and whether
    # it was taken just after a jump.
    tprev_next: Any
    made_jump_next: Any
    # The state at the end of step i and the cotangents there.
    y: Any
    solver_state: Any
    ct_y: Any
    ct_state: Any
    # The cotangents of the inputs, summed over the steps inverted so far.
    ct_args: Any
    ct_terms: Any
    ct_fns: list


def _backward_step(solver, record, saves, args, terms, c: _BackwardCarry):
    # Under `jax.vmap` with different numbers of steps the loop runs until every
    # member is done, and a finished member's results are discarded; its index is
    # clamped so that what it computes meanwhile stays within the record (a
    # Brownian path queried outside its interval would raise).
    i = jnp.maximum(c.i, 0)
    tnext = record.tnext[i]
    tprev = record.tprev(i, c.jumps)
    made_jump0 = record.made_jump_at(i)
    made_jump1 = False if isinstance(record.made_jump, bool) else c.made_jump_next

    ct_y1, ct_args, ct_fns = c.ct_y, c.ct_args, list(c.ct_fns)
    for k, save in enumerate(saves):
        ct_y1, ct_args, ct_fns[k] = save.pull_back_step(
            (ct_y1, ct_args, ct_fns[k]), i, c.tprev_next, c.y, args
        )
    y0, dense_info, state0, _, pullback = solver.backward_step_vjp(
        terms,
        tprev,
        tnext,
        c.y,
        args,
        c.solver_state,
        made_jump0,
        made_jump1,
        ct_y1,
        c.ct_state,
    )
    ct_dense = zeros_cotangent(dense_info)
    for k, save in enumerate(saves):
        ct_dense, ct_args, ct_fns[k] = save.pull_back_ts(
            (ct_dense, ct_args, ct_fns[k]), i, solver, tprev, tnext, dense_info, args
        )
    ct_y0, ct_state0, ct_args_step, ct_terms_step = pullback(ct_dense)
    return _BackwardCarry(
        i=c.i - 1,
        jumps=c.jumps - jnp.asarray(record.jumped_into(i), jnp.int32),
        tprev_next=tprev,
        made_jump_next=jnp.asarray(made_jump0),
        y=y0,
        solver_state=state0,
        ct_y=ct_y0,
        ct_state=ct_state0,
        ct_args=tree_add(ct_args, ct_args_step),
        ct_terms=tree_add(c.ct_terms, ct_terms_step),
        ct_fns=ct_fns,
    )


def _saveat_cotangent(saveat, saves, ct_fns):
    """The cotangent of `saveat`: those of the closure-converted `fn`s of the subs
    whose outputs had a cotangent, zero for everything else (the times are not
    differentiable)."""

    def fns(tree):
        subs = jtu.tree_leaves(tree.subs, is_leaf=is_subsaveat)
        return [sub.fn for sub, saved in zip(subs, is_saved, strict=True) if saved]

    subs = jtu.tree_leaves(saveat.subs, is_leaf=is_subsaveat)
    is_saved = [any(sub is save.sub for save in saves) for sub in subs]
    ct = zeros_cotangent(saveat)
    if not any(is_saved):
        return ct
    return eqx.tree_at(fns, ct, ct_fns, is_leaf=is_none)
