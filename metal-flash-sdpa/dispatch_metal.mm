// dispatch() for the Metal build: encode a planned launch on PyTorch's MPS stream. Only Metal API calls
// live here (the grid, constants and params come from the plans in prefill.cpp, decode.cpp and kv_cache_write.cpp, tested on Linux); it cannot run
// in CI and is checked statically by tests/test_metal_launcher.py.
//
// Encoding goes into the stream's shared compute encoder (stream->commandEncoder(), never endEncoding),
// as mlx-rmsnorm does: MPSStream ends kernel coalescing itself when it must, so this never trips
// "A command encoder is already encoding" under torch.compile (the seed's bug), and attention coalesces
// with the kernels around it.
#import <Foundation/Foundation.h>
#import <Metal/Metal.h>

#include <ATen/mps/MPSStream.h>
#include <ATen/native/mps/OperationUtils.h>
#include <c10/util/Exception.h>

#include <mutex>
#include <string>
#include <unordered_map>

#include "dispatch.h"

#ifdef EMBEDDED_METALLIB_HEADER
#include EMBEDDED_METALLIB_HEADER
#else
#error "kernel-builder defines EMBEDDED_METALLIB_HEADER (the compiled .metal sources)"
#endif

namespace metal_flash_sdpa {

namespace {

// One pipeline per (kernel, function-constant set), created on first use and kept for the process.
id<MTLComputePipelineState> pipeline_for(id<MTLDevice> device, const KernelLaunch& launch) {
  static std::mutex mutex;
  static std::unordered_map<std::string, id<MTLComputePipelineState>> cache;
  static id<MTLLibrary> library = nil;

  std::string key = launch.kernel;
  for (const FunctionConstant& c : launch.constants) key += "," + std::to_string(c.index) + "=" + (c.value ? "1" : "0");
  std::lock_guard<std::mutex> lock(mutex);
  if (auto it = cache.find(key); it != cache.end()) return it->second;

  NSError* error = nil;
  if (library == nil) {
    library = EMBEDDED_METALLIB_NAMESPACE::createLibrary(device, &error);
    TORCH_CHECK(library, "metal-flash-sdpa: cannot load the Metal library: ",
                error ? [[error localizedDescription] UTF8String] : "unknown error");
  }
  MTLFunctionConstantValues* values = [[MTLFunctionConstantValues alloc] init];
  for (const FunctionConstant& c : launch.constants) {
    const bool value = c.value;
    [values setConstantValue:&value type:MTLDataTypeBool atIndex:c.index];
  }
  id<MTLFunction> function = [library newFunctionWithName:[NSString stringWithUTF8String:launch.kernel.c_str()]
                                            constantValues:values
                                                     error:&error];
  [values release];
  TORCH_CHECK(function, "metal-flash-sdpa: no Metal function ", launch.kernel, ": ",
              error ? [[error localizedDescription] UTF8String] : "unknown error");
  id<MTLComputePipelineState> pipeline = [device newComputePipelineStateWithFunction:function error:&error];
  [function release];
  TORCH_CHECK(pipeline, "metal-flash-sdpa: cannot create the pipeline for ", launch.kernel, ": ",
              error ? [[error localizedDescription] UTF8String] : "unknown error");
  cache.emplace(key, pipeline);
  return pipeline;
}

}  // namespace

// Metal does not report core counts: the chip class in the device name ("Apple M3 Max") gives the largest
// configuration of that class (M1-M4 families: base <= 10, Pro <= 20, Max <= 40, Ultra <= 80 cores). A smaller bin
// gets a split sized for more cores: more, shorter partitions, never an idle core.
int64_t gpu_core_count() {
  static const int64_t cores = [] {
    const std::string name = [[at::mps::getCurrentMPSStream()->device() name] UTF8String];
    if (name.find("Ultra") != std::string::npos) return int64_t(80);
    if (name.find("Max") != std::string::npos) return int64_t(40);
    if (name.find("Pro") != std::string::npos) return int64_t(20);
    return int64_t(10);
  }();
  return cores;
}

void dispatch(const KernelLaunch& launch, const std::vector<BufferBinding>& buffers) {
  at::mps::MPSStream* stream = at::mps::getCurrentMPSStream();
  TORCH_CHECK(stream, "metal-flash-sdpa: no MPS stream");
  at::mps::dispatch_sync_with_rethrow(stream->queue(), ^() {
    @autoreleasepool {
      id<MTLComputeCommandEncoder> encoder = stream->commandEncoder();
      id<MTLComputePipelineState> pipeline = pipeline_for(stream->device(), launch);
      // A variant the compiler could only fit with fewer threads (registers) must fail clearly, not dispatch.
      TORCH_CHECK(pipeline.maxTotalThreadsPerThreadgroup >= launch.threads_per_threadgroup, "metal-flash-sdpa: ",
                  launch.kernel, " runs at most ", pipeline.maxTotalThreadsPerThreadgroup,
                  " threads per threadgroup on this GPU; its launch needs ", launch.threads_per_threadgroup);
      [encoder setComputePipelineState:pipeline];
      for (const BufferBinding& b : buffers) {
        if (b.tensor) {
          TORCH_CHECK(b.tensor->device().is_mps(), "metal-flash-sdpa: expected an MPS tensor, got ", b.tensor->device());
          [encoder setBuffer:at::native::mps::getMTLBufferStorage(*b.tensor)
                      offset:b.tensor->storage_offset() * b.tensor->element_size()
                     atIndex:b.index];
        } else {
          [encoder setBytes:b.bytes.data() length:b.bytes.size() atIndex:b.index];
        }
      }
      [encoder dispatchThreadgroups:MTLSizeMake(launch.threadgroups[0], launch.threadgroups[1], launch.threadgroups[2])
              threadsPerThreadgroup:MTLSizeMake(launch.threads_per_threadgroup, 1, 1)];
    }
  });
}

}  // namespace metal_flash_sdpa
