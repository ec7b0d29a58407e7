"""mslsim: run Metal Shading Language compute kernels on the CPU.

    lib = mslsim.load("kernels/reduce.metal")
    stats = lib.dispatch("reduce", threadgroups=64, threads=128, buffers={0: x, 1: out},
                         constants={302: True})

See README.md beside this file for the execution model, the fidelity rules and the checks.
"""
from functools import lru_cache

from .build import MetalCompileError, build_sources, prepass
from .launch import Library, LaunchStats, SimulationError, threadgroup_ids

__all__ = ["load", "Library", "LaunchStats", "MetalCompileError", "SimulationError", "build_sources", "prepass",
           "threadgroup_ids"]


@lru_cache(maxsize=None)
def _load(lib_path: str) -> Library:
    return Library(lib_path)


def load(*sources, defines=(), include_dirs=()) -> Library:
    """Compile (or reuse the cached build of) the given .metal files and load them as one library."""
    return _load(str(build_sources(sources, defines=tuple(defines), include_dirs=tuple(include_dirs))))
