"""`python -m benchmarks`: see `benchmarks/run.py`."""

import pathlib
import sys


# The benchmark scripts import their shared helpers as `_common`, as when each is run
# as `python benchmarks/<name>.py`.
sys.path.insert(0, str(pathlib.Path(__file__).parent))
from run import main  # noqa: E402


main()
