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


# A thread (as Flower's pulls and a site's handler run) makes a 64 MiB block, above
# glibc's 32 MiB cap on mallopt's threshold, frees it, and makes it again.
# (Python bytes, as Flower joins a message's chunks; numpy asks for huge pages itself.)
THREAD_BIG_BLOCK_FAULTS = """
import resource, threading
def second_pass(out):
    b"x" * (64 << 20)  # 64 MiB, every page written, freed at once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    b"x" * (64 << 20)
    out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
out = []
t = threading.Thread(target=second_pass, args=(out,))
t.start(); t.join()
print(out[0])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's environment")
def test_a_run_process_reuses_model_size_blocks_with_the_model_buffer_env() -> None:
    def faults(env: dict[str, str]) -> int:
        out = subprocess.run(
            [sys.executable, "-c", THREAD_BIG_BLOCK_FAULTS],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
            env=env,
        )
        return int(out.stdout.strip())

    import os

    pages = (64 << 20) // 4096
    plain = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    assert faults(plain) > pages // 2
    assert faults(heap.with_model_buffers(plain)) < pages // 50


def test_an_operators_own_malloc_settings_are_kept_whole() -> None:
    assert heap.with_model_buffers({"PATH": "/bin"}) == {"PATH": "/bin", **heap.MODEL_BUFFER_ENV}
    own = {"PATH": "/bin", "MALLOC_ARENA_MAX": "4"}
    assert heap.with_model_buffers(own) == own
    assert heap.with_model_buffers({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}) == {
        "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"
    }
