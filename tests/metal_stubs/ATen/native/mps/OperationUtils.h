#pragma once
#import <Metal/Metal.h>
#include <ATen/core/TensorBase.h>
namespace at::native::mps {
id<MTLBuffer> getMTLBufferStorage(const at::TensorBase& tensor);
}  // namespace at::native::mps
