import gc
import pathlib
import sys

import jax
import pytest


# As diffrax's own test suite: float64 available, and no implicit rank or dtype
# promotion, so that the package works for users with strict settings.
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


# Every compiled XLA program keeps its own memory mappings, and one process compiling
# the whole suite would pass Linux's default limit of 65,530 mappings
# (`vm.max_map_count`), after which XLA's compiler segfaults. Dropping the compiled
# programs after every file stays far below it but recompiles what files share (the
# small eager-mode programs of `jax.random` and `jax.numpy` in every file), so they
# are dropped only once the process holds more than this many mappings; one file
# adds at most about 15,000.
_MAPPINGS = pathlib.Path("/proc/self/maps")
_CLEAR_ABOVE = 35_000


def _mappings() -> int | None:
    try:
        with _MAPPINGS.open() as f:
            return sum(1 for _ in f)
    except OSError:
        return None


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    yield
    count = _mappings()
    if count is None or count > _CLEAR_ABOVE:
        jax.clear_caches()
        gc.collect()


def pytest_collection_modifyitems(session, config, items):
    # The tests of scripts run in the background go last; see tests/processes.py.
    from .processes import scripts_of

    items.sort(key=lambda item: bool(scripts_of(item)))


def pytest_collection_finish(session):
    # Hand some modules to a process of their own, then start the selected tests'
    # scripts; see tests/processes.py. (Here, not in `pytest_collection_modifyitems`,
    # so that the items are those left after `-k` and `-m`.)
    from . import processes

    handed = processes.offload(session.items)
    for item in handed:
        item.runtest = _offloaded_runtest(item.nodeid)
    names = {item.nodeid for item in handed}
    session.items.sort(key=lambda item: item.nodeid in names)
    processes.start([n for item in session.items for n in processes.scripts_of(item)])


def _offloaded_runtest(nodeid):
    def runtest():
        from .processes import offloaded_outcome

        outcome, text = offloaded_outcome(nodeid)
        if outcome == "failed":
            pytest.fail(f"(in the offloaded process)\n{text}", pytrace=False)
        if outcome == "skipped":
            pytest.skip(text)

    return runtest


def pytest_terminal_summary(terminalreporter):
    module = sys.modules.get(f"{__package__}.processes")
    lines = [] if module is None else module.summary()
    if lines:
        terminalreporter.section("background scripts")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session, exitstatus):
    module = sys.modules.get(f"{__package__}.processes")
    if module is not None:
        module.stop()
