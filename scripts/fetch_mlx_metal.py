"""Fetch MLX's Metal kernel headers (shipped in the `mlx-metal` wheel on PyPI) into a local cache, for tests
that run third-party MSL known to work on Apple GPUs through the simulator. Nothing is copied into the
repository: the headers live under build/third_party/ (gitignored).

    python3 scripts/fetch_mlx_metal.py      # prints the include directory (the one holding mlx/)
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VERSION = "0.32.4"
CACHE = REPO / "build" / "third_party" / f"mlx-metal-{VERSION}"
KERNELS = "mlx/include/mlx/backend/metal/kernels/"


class FetchError(RuntimeError):
    """The wheel could not be downloaded (no network or no PyPI access)."""


def include_dir() -> Path:
    """Directory to pass as an include path (MLX's headers include "mlx/backend/metal/kernels/...")."""
    root = CACHE / "mlx" / "include"
    if (root / "mlx" / "backend" / "metal" / "kernels" / "sdpa_vector.h").exists():
        return root
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                            "--platform", "macosx_14_0_arm64", "--disable-pip-version-check",
                            f"mlx-metal=={VERSION}", "-d", tmp], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("mlx_metal-*.whl"))
        if r.returncode or not wheels:
            raise FetchError(f"pip download mlx-metal=={VERSION} failed:\n{r.stderr.strip()[-2000:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extractall(CACHE, [n for n in wheel.namelist() if n.startswith(KERNELS)])
    return root


if __name__ == "__main__":
    print(include_dir())
