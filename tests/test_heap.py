"""The heap tuning that spares DP-SGD steps their page faults (medfed.core.heap)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from medfed.core import heap

# A fresh process allocates twenty 8 MiB blocks, frees them, allocates them again, and
# prints the page faults of the second pass: what a DP step pays for the per-sample
# gradients the step before it freed.
SECOND_PASS_FAULTS = """
import importlib.util, resource, sys
import numpy as np
spec = importlib.util.spec_from_file_location("heap", sys.argv[2])
heap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(heap)
if sys.argv[1] == "tuned":
    assert heap.keep_freed_memory()
def one_pass():
    blocks = [np.ones(1 << 20) for _ in range(20)]  # 8 MiB each, every page touched
    del blocks
one_pass()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
one_pass()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def second_pass_faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", SECOND_PASS_FAULTS, mode, heap.__file__],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_page_faults_once_tuned() -> None:
    if not heap.keep_freed_memory():
        pytest.skip("no glibc here")
    pages = 20 * (8 << 20) // 4096
    # untuned, glibc hands (a quarter of, here) the freed blocks back and faults them in
    assert second_pass_faults("default") > pages // 10
    assert second_pass_faults("tuned") < pages // 50
