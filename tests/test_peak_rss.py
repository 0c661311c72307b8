"""The peak memory `ditk sample` reports is its own process's, not its parent's (Linux's ru_maxrss carries the
parent's peak across fork/exec: a benchmark that spawns ditk would read its own peak back)."""
import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and the inherited ru_maxrss are Linux's")
def test_child_reports_its_own_peak_not_the_parents():
    parent_peak = b"\x01" * (1 << 30)  # 1 GiB touched in this process before the child starts
    code = ("import resource; from ditk.generate import peak_rss_mb; "
            "print(peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    own, inherited = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                               check=True).stdout.split())
    assert inherited > 1024  # the kernel's figure includes this process's peak ...
    assert own < 1000  # ... ditk's does not (importing torch is ~0.5 GB)
    del parent_peak
