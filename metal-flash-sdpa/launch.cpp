#include "launch.h"

#include <algorithm>
#include <iterator>
#include <limits>

namespace metal_flash_sdpa {

namespace {

const char* type_name(ElementType dtype) {   // as in the [[host_name]] of the instantiations
  switch (dtype) {
    case ElementType::Float32: return "float";
    case ElementType::Float16: return "half";
    case ElementType::BFloat16: return "bfloat";
  }
  return "?";
}

}  // namespace

bool is_supported_head_dim(int64_t head_dim) {
  return std::find(std::begin(kHeadDims), std::end(kHeadDims), head_dim) != std::end(kHeadDims);
}

bool is_supported_forward_head_dims(int64_t head_dim, int64_t head_dim_v) {
  if (head_dim == head_dim_v)
    return is_supported_head_dim(head_dim) ||
           std::find(std::begin(kForwardOnlyHeadDims), std::end(kForwardOnlyHeadDims), head_dim) !=
               std::end(kForwardOnlyHeadDims);
  return std::any_of(std::begin(kHeadDimPairs), std::end(kHeadDimPairs),
                     [&](const int64_t* pair) { return pair[0] == head_dim && pair[1] == head_dim_v; });
}

namespace {

template <typename Items, typename Text>
std::string joined(const Items& items, Text text) {
  std::string all;
  for (const auto& item : items) all += (all.empty() ? "" : ", ") + text(item);
  return all;
}

std::string number(int64_t d) { return std::to_string(d); }

}  // namespace

const std::string& supported_head_dims() {
  static const std::string text = joined(kHeadDims, number);
  return text;
}

const std::string& supported_forward_head_dims() {
  static const std::string text = supported_head_dims() + ", " + joined(kForwardOnlyHeadDims, number);
  return text;
}

const std::string& supported_head_dim_pairs() {
  static const std::string text =
      joined(kHeadDimPairs, [](const int64_t* pair) { return "(" + number(pair[0]) + ", " + number(pair[1]) + ")"; });
  return text;
}

std::string kernel_name(const char* base, ElementType dtype, int64_t head_dim, int64_t head_dim_v) {
  std::string name = std::string(base) + "_" + type_name(dtype);
  if (head_dim >= 0) name += "_" + std::to_string(head_dim);
  if (head_dim_v >= 0 && head_dim_v != head_dim) name += "_" + std::to_string(head_dim_v);
  return name;
}

void copy_strides(int64_t dst[3], const Strides3& s) {
  dst[STRIDE_BATCH] = s.batch;
  dst[STRIDE_TOKEN] = s.token;
  dst[STRIDE_HEAD] = s.head;
}

FastDivisor fast_divisor(int64_t divisor) {
  uint32_t shift = 0;
  while ((int64_t(1) << shift) < divisor) ++shift;   // ceil(log2(divisor))
  // multiplier = floor(2^32 (2^shift - divisor) / divisor) + 1, < 2^32 for every divisor >= 1
  const uint64_t multiplier = (uint64_t(1) << 32) * ((uint64_t(1) << shift) - uint64_t(divisor)) / uint64_t(divisor) + 1;
  return {uint32_t(multiplier), shift, int32_t(divisor), 0};
}

AttentionShape attention_shape(const AttentionTensors& t) {
  AttentionShape shape{};
  copy_strides(shape.q_strides, t.q);
  copy_strides(shape.k_strides, t.k);
  copy_strides(shape.v_strides, t.v);
  copy_strides(shape.out_strides, t.out);
  copy_strides(shape.lse_strides, t.lse);
  shape.num_seqs = int32_t(t.num_seqs);
  shape.num_heads = int32_t(t.num_heads);
  shape.num_kv_heads = int32_t(t.num_kv_heads);
  shape.head_dim = int32_t(t.head_dim);   // q and k (the shaders take V's head dim from their template)
  return shape;
}

// causal is the window's right edge at 0 (flash-attn); the shaders apply both masks independently.
MaskParams mask_params(const AttentionOptions& o) {
  MaskParams mask{};
  mask.scale = o.scale;
  mask.softcap = o.softcap;
  mask.window_left = int32_t(o.window_left);
  mask.window_right = int32_t(o.window_right);
  mask.alibi_seq_stride = int32_t(o.alibi_seq_stride);
  return mask;
}

std::vector<FunctionConstant> mask_constants(const AttentionOptions& o) {
  return {{FC_DO_CAUSAL, o.causal},
          {FC_HAS_WINDOW, o.window_left >= 0 || o.window_right >= 0},
          {FC_HAS_SINKS, o.has_sinks},
          {FC_HAS_SOFTCAP, o.softcap > 0.0f},
          {FC_HAS_ALIBI, o.has_alibi}};
}

FunctionConstant kv_vector_constant(const AttentionTensors& t) {
  return vector_copy_constant(t.kv_rows_aligned, KV_TILE_KEYS(t.head_dim), std::max(t.k.token, t.v.token), t.head_dim);
}

FunctionConstant vector_copy_constant(bool rows_aligned, int64_t tile_rows, int64_t token_stride, int64_t head_dim) {
  const int64_t span = (tile_rows - 1) * token_stride + head_dim;
  return {FC_KV_VECTOR, rows_aligned && span <= std::numeric_limits<int32_t>::max()};
}

}  // namespace metal_flash_sdpa
