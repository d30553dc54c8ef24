"""The SDE-GAN recipe of Kidger et al. 2021: a 1-Lipschitz activation and weight
clipping, which together bound the discriminator's Lipschitz constant without a
gradient penalty (and so without the double backpropagation a penalty needs).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, ArrayLike, PyTree


# The largest slope of SiLU, x σ(x), is 1.0998 (at x ≈ 2.40); 0.909 brings it just
# below 1, as in the paper.
_LIPSWISH_SCALE = 0.909


def lipswish(x: ArrayLike) -> Array:
    r"""LipSwish, $0.909 \, x \, \sigma(x)$: SiLU scaled to be 1-Lipschitz.

    Use it as the activation of a Wasserstein GAN's discriminator (for example
    `equinox.nn.MLP(..., activation=diffrax_extras.lipswish)`), together with
    [`diffrax_extras.clip_weights`][], so that the discriminator stays Lipschitz
    without a gradient penalty. Unlike ReLU it is smooth, which a neural CDE's vector
    field needs for its solver to converge at its order.

    **Arguments:**

    - `x`: a floating array (or anything `jax.numpy` turns into one); its dtype is
        kept. Integer inputs are refused.

    **Returns:**

    `0.909 * x * sigmoid(x)`, elementwise, with the dtype of `x`.

    ??? cite "Reference"

        ```bibtex
        @inproceedings{kidger2021efficient,
            title={Efficient and Accurate Gradients for Neural {SDE}s},
            author={Kidger, Patrick and Foster, James and Li, Xuechen and Lyons,
                    Terry},
            booktitle={Advances in Neural Information Processing Systems},
            year={2021}
        }

        @inproceedings{chen2019residual,
            title={Residual Flows for Invertible Generative Modeling},
            author={Chen, Ricky T. Q. and Behrmann, Jens and Duvenaud, David and
                    Jacobsen, J{\"o}rn-Henrik},
            booktitle={Advances in Neural Information Processing Systems},
            year={2019}
        }
        ```
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"`lipswish` needs a floating array `x`, but got dtype {x.dtype}. Cast it "
            "first, for example `x.astype(jnp.float32)`."
        )
    return jnp.asarray(_LIPSWISH_SCALE, dtype=x.dtype) * jax.nn.silu(x)


def _is_linear(x) -> bool:
    return isinstance(x, eqx.nn.Linear)


def _clip_linear(layer):
    if not isinstance(layer, eqx.nn.Linear):
        return layer
    weight = layer.weight
    if not eqx.is_inexact_array(weight):
        raise TypeError(
            "`clip_weights` found an `equinox.nn.Linear` whose `weight` is "
            f"{type(weight).__name__}, not a floating array. Call it on the model "
            "itself, not on a partitioned or filtered copy of it."
        )
    # `out_features="scalar"` means one output.
    out = 1 if layer.out_features == "scalar" else layer.out_features
    limit = 1.0 / out
    return eqx.tree_at(lambda lin: lin.weight, layer, jnp.clip(weight, -limit, limit))


def clip_weights(model: PyTree) -> PyTree:
    r"""Clips the weight of every `equinox.nn.Linear` in `model` to
    $[-1/\text{out\_features}, 1/\text{out\_features}]$; biases and everything else
    are returned unchanged.

    With a 1-Lipschitz activation such as [`diffrax_extras.lipswish`][], each layer's
    Lipschitz constant is then bounded (in the ∞-norm, by the largest absolute row
    sum, at most `in_features / out_features`), so the discriminator of a
    Wasserstein GAN stays Lipschitz as the weight-clipping WGAN needs. Call it after
    every discriminator update:

    ```python
    updates, opt_state = optim.update(grads, opt_state, discriminator)
    discriminator = eqx.apply_updates(discriminator, updates)
    discriminator = diffrax_extras.clip_weights(discriminator)
    ```

    Layers nested at any depth are found (inside `equinox.nn.MLP`, lists, dicts,
    custom modules), and a `jax.vmap`-ed stack of layers (a leading batch axis on
    `weight`) is clipped elementwise like a single one. Works under `jax.jit`.

    **Arguments:**

    - `model`: any PyTree, typically an `equinox.Module`.

    **Returns:**

    A PyTree of the same structure as `model`.

    ??? cite "Reference"

        ```bibtex
        @inproceedings{kidger2021efficient,
            title={Efficient and Accurate Gradients for Neural {SDE}s},
            author={Kidger, Patrick and Foster, James and Li, Xuechen and Lyons,
                    Terry},
            booktitle={Advances in Neural Information Processing Systems},
            year={2021}
        }

        @inproceedings{arjovsky2017wasserstein,
            title={Wasserstein Generative Adversarial Networks},
            author={Arjovsky, Martin and Chintala, Soumith and Bottou, L{\'e}on},
            booktitle={International Conference on Machine Learning},
            year={2017}
        }
        ```
    """
    return jtu.tree_map(_clip_linear, model, is_leaf=_is_linear)
