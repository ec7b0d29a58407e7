import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The Metal build on a Mac; everywhere else the CPU build, which runs the same shaders in the simulator.
DEVICE = "mps" if torch.backends.mps.is_available() else "cpu"
SIMULATED = DEVICE == "cpu"


@pytest.fixture(scope="session")
def fa():
    """The kernel module, loaded through `kernels` exactly as users load it (never by direct import)."""
    import kernels
    if SIMULATED:
        from scripts.build_variant import build
        build()
    return kernels.get_local_kernel(REPO)


@pytest.fixture
def counters(fa):
    """Work counters of the simulated shaders for the duration of one test (CPU build only)."""
    if not SIMULATED:
        pytest.skip("work counters exist only in the simulator build")
    fa.simulator_counters(reset=True)
    return fa.simulator_counters
