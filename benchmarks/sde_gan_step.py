"""An SDE-GAN training step: weight clipping against the gradient penalty.

The generator, discriminator, data and training step are those of
`examples/sde_gan.py` (a neural SDE generator with `ReversibleHeun`,
`BrownianInterval` and `ReversibleAdjoint`; a neural CDE discriminator), in the
example's configurations: `FULL` (batch 1024, the paper's size) in full mode, `SMALL`
(batch 128, the example's default) in quick mode, `SMOKE` in tiny mode. The two
variants differ only in how the discriminator is kept Lipschitz:

- weight clipping + LipSwish (Kidger et al. 2021, up to 1.87x faster than the
  penalty): one gradient of the Wasserstein loss, then `clip_weights`;
- the WGAN-GP gradient penalty: a second gradient, of the penalty, which needs the
  discriminator's solve differentiated twice (`diffrax.DirectAdjoint`).

Time per step is the median of interleaved repeats of both compiled steps from the
same initialisation and batch keys; compile time (`_common.compile_timed`: lowering
and compiling, not running) is reported separately. Writes
`benchmarks/results/sde_gan_step{_quick,_tiny}.{json,md}`.

Run: `python benchmarks/sde_gan_step.py [--mode full|quick|tiny]`.
"""

import importlib.util
import pathlib

import jax.random as jr
from _common import (
    bar_chart,
    compile_timed,
    describe,
    interleaved_medians,
    KIDGER,
    log,
    machine,
    markdown_table,
    parse_args,
    save,
)


def load_example():
    path = pathlib.Path(__file__).parent.parent / "examples" / "sde_gan.py"
    spec = importlib.util.spec_from_file_location("sde_gan_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(example, config, repeats):
    data_key, init_key, step_key = jr.split(jr.key(0), 3)
    data = example.ou_data(data_key, config.num_data, config.t_size)
    fns, compile_s = {}, {}
    for variant in (example.CLIP, example.GP):
        step, state = example.setup(variant, config, init_key)
        compiled, compile_s[variant.name] = compile_timed(step, *state, data, step_key)
        fns[variant.name] = lambda c=compiled, state=state: c(*state, data, step_key)
    seconds = interleaved_medians(fns, repeats)
    rows = []
    for name in fns:
        rows.append(
            dict(
                variant=name,
                ms_per_step=1e3 * seconds[name],
                compile_seconds=compile_s[name],
            )
        )
        log(**rows[-1])
    return rows


def markdown(rows, info, config, repeats) -> str:
    intro = (
        f"{describe(info)} SDE-GAN of `examples/sde_gan.py`: batch {config.batch}, "
        f"{config.t_size} times, hidden state {config.hidden}, MLP width "
        f"{config.width}; median of {repeats} interleaved repeats of one training "
        "step (generator and discriminator updated together)."
    )
    clip = rows[0]["ms_per_step"]
    table = [
        [
            r["variant"],
            f"{r['ms_per_step']:.1f}",
            f"{r['ms_per_step'] / clip:.2f}x",
            f"{r['compile_seconds']:.1f}",
        ]
        for r in rows
    ]
    header = ["variant", "ms per step:", "time vs clipping:", "compile (s):"]
    return intro + "\n\n" + markdown_table(header, table)


def main():
    args = parse_args(__doc__, repeats=10)
    example = load_example()
    config = {"full": example.FULL, "quick": example.SMALL, "tiny": example.SMOKE}[
        args.mode
    ]
    info = machine()
    rows = run(example, config, args.repeats)
    payload = dict(machine=info, config=config._asdict(), rows=rows)
    save("sde_gan_step", args, payload, markdown(rows, info, config, args.repeats))


# The runner's report (`python -m benchmarks`): this section's title, its rows
# in the headline table, and its chart.
TITLE = "SDE-GAN step: weight clipping against gradient penalty"


def headline(data) -> list[dict]:
    clip, penalty = data["rows"]
    return [
        dict(
            comparison=f"SDE-GAN training step, batch {data['config']['batch']}",
            ours="weight clipping + LipSwish",
            instead_of="gradient penalty",
            measured=penalty["ms_per_step"] / clip["ms_per_step"],
            unit="x faster",
            paper=1.87,
            source=f"{KIDGER}: up to 1.87x",
        )
    ]


def chart(data, path) -> None:
    rows = data["rows"]
    series = {"ms per step": [r["ms_per_step"] for r in rows]}
    bar_chart(path, TITLE, [r["variant"] for r in rows], series, "ms per step")


if __name__ == "__main__":
    main()
