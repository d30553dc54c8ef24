import gc

import jax
import pytest


# As diffrax's own test suite: float64 available, and no implicit rank or dtype
# promotion, so that the package works for users with strict settings.
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    # Every compiled XLA program keeps its own memory mappings, and one process
    # compiling the whole suite would pass Linux's default limit of 65,530 mappings
    # (`vm.max_map_count`), after which XLA's compiler segfaults. Programs are shared
    # within a test file, not across them, so each file's are dropped when it ends.
    yield
    jax.clear_caches()
    gc.collect()
