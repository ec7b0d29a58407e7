import os

import pytest

# The suite runs with the host data checks on (on MPS they are off by default, as they cost a device->host
# sync); tests of the unchecked paths set METAL_FLASH_SDPA_CHECK_DATA=0 themselves (monkeypatch).
os.environ.setdefault("METAL_FLASH_SDPA_CHECK_DATA", "1")


from tests.helpers import KERNEL, SIMULATED


@pytest.fixture(scope="session")
def fa():
    """The kernel module, loaded through `kernels` exactly as users load it (never by direct import)."""
    return KERNEL


@pytest.fixture
def counters(fa):
    """Work counters of the simulated shaders for the duration of one test (CPU build only)."""
    if not SIMULATED:
        pytest.skip("work counters exist only in the simulator build")
    fa.simulator_counters(reset=True)
    return fa.simulator_counters


def pytest_terminal_summary(terminalreporter):
    """Figures tests report rather than assert (record_property("report", text)), printed once at the end of the run
    (a property travels with the test's report, so this also works under pytest-xdist workers)."""
    reports = terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", [])
    lines = [value for report in reports for name, value in getattr(report, "user_properties", []) if name == "report"]
    if lines:
        terminalreporter.write_sep("-", "reported figures")
        for line in lines:
            terminalreporter.write_line(line)
