"""Static checks of the Metal launcher (dispatch_metal.mm), which cannot be built or run on Linux: it
keeps only Metal API calls, uses the torch MPS API that exists in the pinned torch headers, encodes on
the stream's shared encoder, caches pipelines per constant set and binds tensors at their offsets."""
import re
from pathlib import Path

import torch.utils.cpp_extension

from tests.helpers import REPO

SOURCE = (REPO / "metal-flash-sdpa" / "dispatch_metal.mm").read_text()
CODE = re.sub(r"//[^\n]*", "", SOURCE)
TORCH_INCLUDE = Path(torch.utils.cpp_extension.include_paths()[0])


def test_includes_exist_in_the_pinned_torch_headers():
    for header in re.findall(r'#include <(ATen/[^>]+|c10/[^>]+)>', CODE):
        assert (TORCH_INCLUDE / header).is_file(), header


def test_torch_mps_api_it_calls_is_declared_there():
    stream_h = (TORCH_INCLUDE / "ATen/mps/MPSStream.h").read_text()
    utils_h = (TORCH_INCLUDE / "ATen/native/mps/OperationUtils.h").read_text()
    assert "at::mps::getCurrentMPSStream()" in CODE and "TORCH_API MPSStream* getCurrentMPSStream();" in stream_h
    assert "at::mps::dispatch_sync_with_rethrow(" in CODE
    assert "void dispatch_sync_with_rethrow(dispatch_queue_t queue, void (^block)());" in stream_h
    for method in ["commandEncoder()", "queue()", "device()"]:
        assert f"stream->{method}" in CODE and re.search(rf"\b{re.escape(method[:-2])}\(\)", stream_h), method
    assert "at::native::mps::getMTLBufferStorage(" in CODE and "getMTLBufferStorage(const TensorBase& tensor)" in utils_h


def test_encodes_on_the_shared_encoder():
    assert "stream->commandEncoder()" in CODE
    for forbidden in ["endEncoding", "computeCommandEncoder]", "commandBuffer]", "synchronize("]:
        assert forbidden not in CODE, forbidden


def test_pipelines_are_cached_per_function_constant_set():
    assert re.search(r"static std::unordered_map<std::string, id<MTLComputePipelineState>> cache", CODE)
    assert "c.index" in CODE and "c.value" in CODE   # the key includes every constant
    assert CODE.count("newComputePipelineStateWithFunction") == 1


def test_binds_tensors_at_their_storage_offset():
    assert "offset:b.tensor->storage_offset() * b.tensor->element_size()" in CODE
    assert "setBytes:b.bytes.data() length:b.bytes.size()" in CODE


def test_launch_geometry_comes_from_the_plan_only():
    """No shapes, params or buffer indices here: everything the kernel sees is planned beside its shader (prefill.cpp, ...)."""
    assert "launch.threadgroups[0], launch.threadgroups[1], launch.threadgroups[2]" in CODE
    assert "threadsPerThreadgroup:MTLSizeMake(launch.threads_per_threadgroup, 1, 1)" in CODE
    for planned in ["PREFILL_", "Params", ".sizes()", ".size(0", ".stride("]:
        assert planned not in CODE, planned


def test_defines_the_dispatch_declared_in_dispatch_h():
    declaration = re.search(r"void dispatch\([^)]*\);", (REPO / "metal-flash-sdpa" / "dispatch.h").read_text()).group(0)
    assert declaration[:-1] + " {" in CODE


def objc_syntax_check(path, tmp_path):
    """clang -fsyntax-only as Objective-C++ against tests/metal_stubs (Apple API declarations) + torch headers."""
    import subprocess
    from mslsim.build import compiler
    stubs = REPO / "tests" / "metal_stubs"
    cmd = [compiler(), "-fsyntax-only", "-Werror", "-x", "objective-c++", "-fblocks", "-std=c++17", f"-I{stubs}",
           *[f"-isystem{p}" for p in torch.utils.cpp_extension.include_paths()],
           '-DEMBEDDED_METALLIB_HEADER="metallib.h"', f"-I{REPO / 'metal-flash-sdpa'}", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_launcher_compiles_as_objective_cpp(tmp_path):
    result = objc_syntax_check(REPO / "metal-flash-sdpa" / "dispatch_metal.mm", tmp_path)
    assert result.returncode == 0, result.stderr


def test_syntax_check_has_teeth(tmp_path):
    """A misspelled selector or a wrong C++ call in the launcher fails the check."""
    for good, bad in [("setBuffer:", "setBufer:"), ("launch.threads_per_threadgroup", "launch.threads"),
                      ("stream->commandEncoder()", "stream->encoder()")]:
        mutated = tmp_path / "dispatch_metal.mm"
        mutated.write_text(SOURCE.replace(good, bad))
        assert objc_syntax_check(mutated, tmp_path).returncode != 0, bad
