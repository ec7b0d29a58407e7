"""The build loads the way users load it: kernels.get_local_kernel, and get_kernel(..., version=2) with
LOCAL_KERNELS pointing at this repository (no network); kernels-style variant layout and metadata."""
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, SIMULATED

PUBLIC = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "kv_cache_write"]


def test_public_functions(fa):
    for name in PUBLIC:
        assert callable(getattr(fa, name))


def test_get_kernel_with_local_kernels_override(fa):
    """A fresh interpreter, as a user's script: get_kernel by repo id and version, resolved locally."""
    script = (
        "import torch, kernels\n"
        "fa = kernels.get_kernel('kernels-community/metal-flash-sdpa', version=2)\n"
        "q = torch.randn(1, 40, 2, 64)\n"
        "out = fa.flash_attn_func(q, q, q, causal=True, window_size=(7, 0), s_aux=torch.zeros(2))\n"
        "print(fa.__file__, out.shape[1])\n")
    env = {"LOCAL_KERNELS": f"kernels-community/metal-flash-sdpa={REPO}", "HF_HUB_OFFLINE": "1",
           "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd="/")
    assert r.returncode == 0, r.stderr
    path, rows = r.stdout.split()
    assert path == fa.__file__ and rows == "40"


@pytest.mark.skipif(not SIMULATED, reason="describes the CPU (simulator) variant")
def test_variant_layout_and_metadata(fa):
    variant = REPO / "build" / f"torch{torch.__version__.split('.')[0]}{torch.__version__.split('.')[1]}-cxx11-cpu-x86_64-linux"
    assert fa.__file__ == str(variant / "__init__.py")
    metadata = json.loads((variant / "metadata.json").read_text())
    namespace = fa._ops.add_op_namespace_prefix("x").split("::")[0]
    assert metadata == {"id": namespace, "name": "metal-flash-sdpa", "version": 2, "license": "Apache-2.0",
                        "python-depends": [], "backend": {"type": "cpu"}}
    assert len(list(variant.glob(f"{namespace}*.so"))) == 1


@pytest.mark.skipif(not SIMULATED, reason="describes the CPU (simulator) variant")
def test_compat_subfolder_exports_the_same_api(fa):
    compat = REPO / "build" / fa.__file__.split("/")[-2] / "metal_flash_sdpa"
    spec = importlib.util.spec_from_file_location("compat_metal_flash_sdpa", compat / "__init__.py",
                                                  submodule_search_locations=[str(compat)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    q = torch.randn(1, 9, 2, 32)
    for name in PUBLIC:
        assert callable(getattr(module, name))
    assert torch.equal(module.flash_attn_func(q, q, q), fa.flash_attn_func(q, q, q))


def test_variant_choice_on_other_systems():
    """kernels picks the Metal build on a Mac, and rejects this CPU (x86_64 Linux) build there with a
    message that says why (private resolver of the pinned kernels 0.17.2, fed explicit systems)."""
    from packaging.version import Version
    from kernels.backends import CPU, Metal
    from kernels.variants import _resolve_variant_for_system, parse_variant, variants_trace_str

    ours, metal = parse_variant("torch213-cxx11-cpu-x86_64-linux"), parse_variant("torch213-metal-aarch64-darwin")
    chosen, trace = _resolve_variant_for_system([ours, metal], Metal(), "aarch64", "darwin", Version("2.13"), None,
                                                None, Version("26.0"))
    assert chosen == [metal]
    assert "CPU (x86_64) does not match system CPU (aarch64)" in variants_trace_str(trace)
    chosen, trace = _resolve_variant_for_system([ours, metal], CPU(), "aarch64", "darwin", Version("2.13"), None,
                                                None, Version("26.0"))
    assert chosen == [] and "backend (metal) does not match selected backend (cpu)" in variants_trace_str(trace)
    chosen, _ = _resolve_variant_for_system([ours, metal], CPU(), "x86_64", "linux", Version("2.13"), True, None, None)
    assert chosen == [ours]
