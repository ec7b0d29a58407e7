// Argument checks and tensor-to-plan helpers shared by the ops (attention.cpp, kvcache.cpp). Every message
// names the argument, the value and what is accepted; the TORCH_CHECK_{VALUE,TYPE,NOT_IMPLEMENTED} forms
// surface in Python as ValueError / TypeError / NotImplementedError.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

#include "launch_plan.h"

namespace metal_flash_sdpa {

inline ElementType element_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ElementType::Float32;
    case at::kHalf: return ElementType::Float16;
    case at::kBFloat16: return ElementType::BFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, " has dtype ", t.scalar_type(),
                       "; supported: torch.float16, torch.bfloat16, torch.float32");
  }
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK_VALUE(t.device() == q.device(), name, " is on ", t.device(), " but q is on ", q.device(),
                    "; all tensors must be on the same device");
}

// Checks that read index data (cu_seqlens, cache_seqlens, block_table) on the host. On by default; setting
// METAL_FLASH_SDPA_SKIP_DATA_CHECKS=1 skips the device-to-host copies they cost on MPS. The kernels guard
// every index they derive from data anyway, so skipping can give wrong answers for bad data, never
// out-of-bounds accesses (the tests use it to prove exactly that).
inline bool data_checks_enabled() {
  const char* skip = std::getenv("METAL_FLASH_SDPA_SKIP_DATA_CHECKS");
  return !(skip && std::strcmp(skip, "1") == 0);
}

// [total, H, D] (batch stride 0) or [B, S, H, D] / [blocks, slots, H, D] views; the head dim is contiguous.
inline Strides3 token_strides(const at::Tensor& t, bool varlen) {   // [total, H, D] or [B, S, H, D]
  return varlen ? Strides3{0, t.stride(0), t.stride(1)} : Strides3{t.stride(0), t.stride(1), t.stride(2)};
}

inline at::Tensor unit_stride_head_dim(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

}  // namespace metal_flash_sdpa
