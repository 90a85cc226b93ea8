"""torchrun entry point for the skew test: rank 1's clock runs at a tenth of real speed, so the
ranks disagree on when the time budget is reached unless they decide it together."""

import os
import runpy
import time

if os.environ.get("RANK") == "1":
    _real = time.perf_counter
    time.perf_counter = lambda: _real() * 0.1

runpy.run_module("copa", run_name="__main__", alter_sys=True)
