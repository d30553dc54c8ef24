import jax


# As diffrax's own test suite: float64 available, and no implicit rank or dtype
# promotion, so that the package works for users with strict settings.
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
