// The one device-specific step: encode a planned kernel launch with its buffers. Implemented by
// dispatch_metal.mm (MPS stream) and dispatch_simulator.cpp (CPU tensors, the MSL simulator).
#pragma once
#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "launch.h"

namespace metal_flash_sdpa {

struct BufferBinding {
  int index;                    // [[buffer(index)]]
  const at::Tensor* tensor;     // bound at its storage offset (setBuffer:offset:) ...
  std::string bytes;            // ... or, when tensor is null, small constant data (setBytes)
};

inline BufferBinding bind_tensor(int index, const at::Tensor& tensor) { return {index, &tensor, {}}; }

template <typename T>
BufferBinding bind_bytes(int index, const T& value) {
  return {index, nullptr, std::string(reinterpret_cast<const char*>(&value), sizeof(T))};
}

// Metal needs every buffer argument bound, even ones a function constant switches off: a 4-byte stand-in.
inline BufferBinding bind_optional(int index, const at::Tensor& tensor) {
  return tensor.defined() ? bind_tensor(index, tensor) : bind_bytes(index, int32_t(0));
}

void dispatch(const KernelLaunch& launch, const std::vector<BufferBinding>& buffers);

// GPU cores of the device the launches run on (decode sizes its split-K grid to fill them).
int64_t gpu_core_count();

}  // namespace metal_flash_sdpa
