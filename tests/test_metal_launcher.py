"""Static checks of the Metal launcher (dispatch_metal.mm), which cannot be compiled or run on Linux: it
keeps only Metal API calls, uses the torch MPS API that exists in the pinned torch headers, encodes on
the stream's shared encoder, caches pipelines per constant set and binds tensors at their offsets."""
import re
from pathlib import Path

import torch.utils.cpp_extension

from tests.conftest import REPO

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
    """No shapes, params or buffer indices here: everything the kernel sees is planned in launch_plan.cpp."""
    assert "launch.threadgroups[0], launch.threadgroups[1], launch.threadgroups[2]" in CODE
    assert "threadsPerThreadgroup:MTLSizeMake(launch.threads_per_threadgroup, 1, 1)" in CODE
    for planned in ["PREFILL_", "Params", ".sizes()", ".size(0", ".stride("]:
        assert planned not in CODE, planned


def test_defines_the_dispatch_declared_in_dispatch_h():
    declaration = re.search(r"void dispatch\([^)]*\);", (REPO / "metal-flash-sdpa" / "dispatch.h").read_text()).group(0)
    assert declaration[:-1] + " {" in CODE
