"""Build the simulator-backed CPU variant of metal-flash-sdpa, kernels-style, on Linux.

    python3 scripts/build_variant.py        # prints the variant directory

Produces build/torch<XY>-cxx11-cpu-x86_64-linux/ (flat: __init__.py, _ops.py, the extension .so,
metadata.json; plus the compat sub-folder metal_flash_sdpa/) from the sources build.toml gives kernel-builder
for the Metal build, with the Metal launcher swapped for the simulator's (SIMULATOR_SWAP): .cpp files are
compiled against torch with CPU_KERNEL defined, .metal files through the MSL simulator (mslsim), and
everything is linked with the simulator runtime into one extension. kernel-builder never sees this variant.
Objects and the variant are cached and rebuilt only when a source, the toolchain or torch changes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mslsim import build as mslsim_build  # noqa: E402

PACKAGE = "metal_flash_sdpa"
OBJECT_CACHE = REPO / "build" / "objects"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def variant_name() -> str:
    import torch
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    abi = "cxx11" if torch._C._GLIBCXX_USE_CXX11_ABI else "cxx98"
    return f"torch{major}{minor}-{abi}-cpu-x86_64-linux"


# The Metal launcher and what the simulator build uses instead of it.
SIMULATOR_SWAP = {"metal-flash-sdpa/dispatch_metal.mm": ["metal-flash-sdpa/dispatch_simulator.cpp"]}


def cpu_sources(config: dict) -> list[Path]:
    sources = list(config["torch"]["src"])
    for kernel in config["kernel"].values():
        if kernel["backend"] == "metal":
            sources += kernel["src"]
    sources = [swapped for s in sources for swapped in SIMULATOR_SWAP.get(s, [s])]
    return [REPO / s for s in dict.fromkeys(sources)]


def torch_flags() -> list[str]:
    from torch.utils import cpp_extension
    import torch
    return ["-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-DCPU_KERNEL",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            # Sources include each other by relative paths, as kernel-builder builds them; only the generated
            # registration.h and the simulator's C ABI come from include paths.
            f"-I{REPO / 'scripts' / 'kernel_builder'}",
            f"-I{mslsim_build.INCLUDE_DIR}", f"-I{sysconfig.get_paths()['include']}",
            *[f"-isystem{p}" for p in cpp_extension.include_paths()]]


def compile_cpp(cxx: str, source: Path, flags: list[str], headers_key: str, extension: str) -> Path:
    # Only the sources that register ops name the extension (the name changes with every source: the other objects
    # stay cached). A header using it outside their macros would fail to compile, not build a stale object.
    text = source.read_text()
    if "TORCH_EXTENSION_NAME" in text:
        flags = [*flags, f"-DTORCH_EXTENSION_NAME={extension}"]
    key = _sha(mslsim_build.portable_key("\n".join([cxx, " ".join(flags), headers_key, text])).encode())[:20]
    return mslsim_build.cached_build(source.stem, key, ".o", lambda tmp: mslsim_build.compile_to(
        tmp / f"{source.stem}.o", [cxx, *flags, "-c", str(source)], f"compiling {source.relative_to(REPO)}"),
        cache_dir=OBJECT_CACHE)


COMPAT_INIT = '''"""Compatibility folder (kernels' older layout): the same module as the variant directory above."""
import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path

_parent = _Path(__file__).resolve().parent.parent
_name = __name__ + "._variant"
_spec = _util.spec_from_file_location(_name, _parent / "__init__.py", submodule_search_locations=[str(_parent)])
_module = _sys.modules.get(_name) or _util.module_from_spec(_spec)
if _name not in _sys.modules:
    _sys.modules[_name] = _module
    _spec.loader.exec_module(_module)
globals().update({k: v for k, v in vars(_module).items() if not k.startswith("__")})
'''


def build(quiet: bool = True) -> Path:
    import torch
    config = tomllib.loads((REPO / "build.toml").read_text())
    sources = cpu_sources(config)
    python_files = sorted((REPO / "torch-ext" / PACKAGE).glob("*.py"))
    cxx = mslsim_build.compiler()
    toolchain = mslsim_build.toolchain_key(cxx)
    everything = sources + python_files + [Path(__file__), REPO / "scripts" / "kernel_builder" / "registration.h",
                                           REPO / "build.toml"]
    files = [f"{p.relative_to(REPO)}\n{p.read_text()}" for p in everything if p.is_file()]
    source_key = _sha("\n".join([torch.__version__, toolchain] + files).encode())
    extension = f"_{PACKAGE}_{source_key[:10]}"
    out_dir = REPO / "build" / variant_name()
    stamp = out_dir / ".build-key"
    if stamp.exists() and stamp.read_text() == source_key:
        return out_dir

    flags = torch_flags()
    # What a C++ object depends on besides its source and flags: torch's headers (by version), mslsim's, ours.
    headers = "".join(p.read_text() for p in everything if p.suffix == ".h")
    headers_key = _sha((torch.__version__ + toolchain + headers).encode())
    cpp = [s for s in sources if s.suffix == ".cpp"]
    metal = [s for s in sources if s.suffix == ".metal"]
    if not quiet:
        print(f"build_variant: compiling {len(cpp)} C++ and {len(metal)} Metal sources", file=sys.stderr)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        # Longest first (the shaders, biggest source first; each compiles its two twins in parallel), so the
        # long pole starts at once and the C++ fills the gaps.
        metal_jobs = {s: pool.submit(mslsim_build.metal_object, s, (), [REPO / "metal-flash-sdpa"])
                      for s in sorted(metal, key=lambda s: -s.stat().st_size)}
        cpp_jobs = [pool.submit(compile_cpp, cxx, s, flags, headers_key, extension) for s in cpp]
        objects = [j.result() for j in cpp_jobs] + [metal_jobs[s].result() for s in metal]
    objects.append(mslsim_build.runtime_object(cxx))

    from torch.utils import cpp_extension
    torch_lib = cpp_extension.library_paths()[0]
    staging = Path(tempfile.mkdtemp(dir=REPO / "build", prefix=".variant-"))
    try:
        so = staging / f"{extension}{sysconfig.get_config_var('EXT_SUFFIX')}"
        r = subprocess.run([cxx, "-shared", "-Wl,-Bsymbolic", *map(str, objects), f"-L{torch_lib}", "-ltorch",
                            "-ltorch_cpu", "-lc10", "-lpthread", "-o", str(so)], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"linking {so.name} failed:\n{r.stderr}")
        for py in python_files:
            shutil.copy2(py, staging / py.name)
        (staging / "_ops.py").write_text(
            f"import torch\nfrom . import {extension}\n\nops = torch.ops.{extension}\n\n\n"
            f"def add_op_namespace_prefix(op_name: str) -> str:\n    return f\"{extension}::{{op_name}}\"\n")
        (staging / PACKAGE).mkdir()
        (staging / PACKAGE / "__init__.py").write_text(COMPAT_INIT)
        general = config["general"]
        (staging / "metadata.json").write_text(json.dumps({
            "id": extension, "name": general["name"], "version": general["version"],
            "license": general["license"], "python-depends": [], "backend": {"type": "cpu"}}, indent=2) + "\n")
        (staging / ".build-key").write_text(source_key)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


if __name__ == "__main__":
    print(build(quiet=False))
