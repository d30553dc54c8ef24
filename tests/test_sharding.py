"""A batch of neural SDE solves sharded over 4 devices gives the loss and gradients
of the unsharded batch. Runs `tests/sharding_script.py` in its own process (started
early; see `tests/processes.py`), since the device count is fixed when JAX starts."""

import json

import pytest

from .processes import result


@pytest.mark.script("sharding")
def test_sharded_batch_matches_unsharded():
    out, _ = result("sharding")
    report = json.loads(out.strip().splitlines()[-1])
    assert report["devices"] == 4 and report["input_devices"] == 4
    # Each device solves its own samples with the same program; only the mean's
    # reduction across devices is summed in another order, so equal to rounding.
    assert report["max_relative_difference"] < 1e-13, report
