// Op schemas and their registration. The namespace is the extension name the builder generates
// (TORCH_EXTENSION_NAME); Python reaches the ops through `_ops.ops`, never a hard-coded "ns::op".
#include <torch/library.h>

#include <algorithm>
#include <array>

#include "../metal-flash-sdpa/decode.h"
#include "../metal-flash-sdpa/launch.h"
#include "registration.h"
#include "torch_binding.h"

// The kernels' fixed sizes, read by the Python package, the tests and the benchmarks (never re-typed there).
static c10::Dict<std::string, std::vector<int64_t>> kernel_constants() {
  using namespace metal_flash_sdpa;
  c10::Dict<std::string, std::vector<int64_t>> constants;
  std::vector<int64_t> head_dims(std::begin(kHeadDims), std::end(kHeadDims)), tile_keys, head_parts;
  const std::vector<int64_t> forward_only(std::begin(kForwardOnlyHeadDims), std::end(kForwardOnlyHeadDims));
  std::vector<int64_t> pairs;   // flattened (q/k, v)
  for (const auto& pair : kHeadDimPairs) pairs.insert(pairs.end(), {pair[0], pair[1]});
  std::vector<int64_t> forward_dims = head_dims;   // every q/k head dim a forward kernel has
  forward_dims.insert(forward_dims.end(), forward_only.begin(), forward_only.end());
  for (const auto& pair : kHeadDimPairs)
    if (std::find(forward_dims.begin(), forward_dims.end(), pair[0]) == forward_dims.end()) forward_dims.push_back(pair[0]);
  for (int64_t d : forward_dims) tile_keys.push_back(KV_TILE_KEYS(d));
  for (int64_t d : head_dims) head_parts.push_back(HEAD_PARTS(d));   // every v head dim is one of these
  for (int64_t d : forward_only) head_parts.push_back(HEAD_PARTS(d));
  constants.insert("head_dims", head_dims);
  constants.insert("forward_only_head_dims", forward_only);
  constants.insert("head_dim_pairs", pairs);
  constants.insert("forward_head_dims", forward_dims);
  constants.insert("kv_tile_keys", tile_keys);   // per forward head dim (q/k)
  constants.insert("head_parts", head_parts);    // per head dim, then forward-only head dim (v)
  constants.insert("prefill_block_q", std::vector<int64_t>{PREFILL_BLOCK_Q});
  std::vector<int64_t> backward_tile_queries_32bit, backward_tile_queries_16bit;   // per head dim
  for (int64_t d : head_dims) {
    backward_tile_queries_32bit.push_back(BACKWARD_TILE_QUERIES(4, d));
    backward_tile_queries_16bit.push_back(BACKWARD_TILE_QUERIES(2, d));
  }
  constants.insert("backward_block_q", std::vector<int64_t>{BACKWARD_BLOCK_Q});
  constants.insert("backward_block_k", std::vector<int64_t>{BACKWARD_BLOCK_K});
  constants.insert("backward_tile_queries_32bit", backward_tile_queries_32bit);
  constants.insert("backward_tile_queries_16bit", backward_tile_queries_16bit);
  constants.insert("decode_max_new_tokens", std::vector<int64_t>{kDecodeMaxNewTokens});
  constants.insert("decode_max_partitions", std::vector<int64_t>{kDecodeMaxPartitions});
  constants.insert("decode_scratch_bytes", std::vector<int64_t>{kDecodeScratchBytes});
  // Per (q/k, v) head dims in the order of the Python module's FORWARD_HEAD_DIMS: (d, d), then the pairs.
  std::vector<int64_t> decode_threadgroup_bytes_32bit, decode_threadgroup_bytes_16bit;
  std::vector<std::array<int64_t, 2>> forward_pairs;
  for (int64_t d : head_dims) forward_pairs.push_back({d, d});
  for (int64_t d : forward_only) forward_pairs.push_back({d, d});
  for (const auto& pair : kHeadDimPairs) forward_pairs.push_back({pair[0], pair[1]});
  for (const auto& [dk, dv] : forward_pairs) {
    decode_threadgroup_bytes_32bit.push_back(DECODE_THREADGROUP_BYTES(4, dk, dv));
    decode_threadgroup_bytes_16bit.push_back(DECODE_THREADGROUP_BYTES(2, dk, dv));
  }
  constants.insert("decode_threadgroup_bytes_32bit", decode_threadgroup_bytes_32bit);
  constants.insert("decode_threadgroup_bytes_16bit", decode_threadgroup_bytes_16bit);
  constants.insert("saturation_simdgroups", std::vector<int64_t>{SATURATION_SIMDGROUPS});
  return constants;
}

// Quantized caches (decode and KV write): scales / biases are written by the append.
#define KV_QUANT_ARGS                                                                                              \
  "Tensor(c!)? k_scales=None, Tensor(d!)? k_biases=None, Tensor(e!)? v_scales=None, Tensor(f!)? v_biases=None, " \
  "int k_bits=0, int v_bits=0, int group_size=0, Tensor? k_descale=None, Tensor? v_descale=None"

TORCH_LIBRARY_EXPAND(TORCH_EXTENSION_NAME, ops) {
  ops.def(
      "flash_attn_varlen(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float? softmax_scale, bool causal, int window_left, "
      "int window_right, float softcap, Tensor? alibi_slopes, Tensor? s_aux, Tensor? block_table=None, "
      "Tensor? seqused_k=None) -> (Tensor out, Tensor softmax_lse)");
  ops.def(
      "flash_attn_varlen_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, "
      "Tensor? dsoftmax_lse, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
      "float? softmax_scale, bool causal, int window_left, int window_right, float softcap, Tensor? alibi_slopes, "
      "Tensor? s_aux, int num_splits=0, bool[3] output_mask=[True, True, True]) -> (Tensor dq, Tensor dk, Tensor dv, "
      "Tensor ds_aux)");
  ops.def(
      "flash_attn_decode(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k_new, Tensor? v_new, "
      "Tensor? block_table, Tensor? cache_batch_idx, Tensor? cache_seqlens, Tensor? kv_start, int num_splits, "
      "float? softmax_scale, bool causal, int window_left, int window_right, float softcap, Tensor? alibi_slopes, "
      "Tensor? s_aux, " KV_QUANT_ARGS ") -> (Tensor out, Tensor softmax_lse)");
  ops.def(
      "kv_cache_write(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor block_table, "
      "Tensor cache_seqlens, " KV_QUANT_ARGS ") -> ()");
  ops.def("quantize_kv(Tensor x, int bits, int group_size) -> (Tensor packed, Tensor scales, Tensor biases)");
  ops.def("kernel_constants() -> Dict(str, int[])", &kernel_constants);
  ops.def("decode_split(int batch, int num_heads, int num_kv_heads, int seqlen_q, int head_dim, int element_bytes, "
          "int max_keys, int window_left, int num_splits, int gpu_cores, int head_dim_v=0) -> int[]",
          &metal_flash_sdpa::decode_split);
  ops.def("backward_chunks(int batch, int num_kv_heads, int head_dim, int element_bytes, int max_seqlen_k, "
          "int num_splits, int gpu_cores) -> int", &metal_flash_sdpa::backward_chunks);
  ops.impl("flash_attn_varlen", c10::kMeta, &metal_flash_sdpa::flash_attn_varlen_meta);
  ops.impl("flash_attn_varlen_backward", c10::kMeta, &metal_flash_sdpa::flash_attn_varlen_backward_meta);
  ops.impl("flash_attn_decode", c10::kMeta, &metal_flash_sdpa::flash_attn_decode_meta);
  ops.impl("kv_cache_write", c10::kMeta, &metal_flash_sdpa::kv_cache_write_meta);
  ops.impl("quantize_kv", c10::kMeta, &metal_flash_sdpa::quantize_kv_meta);
#if defined(CPU_KERNEL)
  // The CPU build runs the Metal shaders in the MSL simulator (dispatch_simulator.cpp also registers
  // simulator_counters there).
  ops.impl("flash_attn_varlen", c10::kCPU, &metal_flash_sdpa::flash_attn_varlen);
  ops.impl("flash_attn_varlen_backward", c10::kCPU, &metal_flash_sdpa::flash_attn_varlen_backward);
  ops.impl("flash_attn_decode", c10::kCPU, &metal_flash_sdpa::flash_attn_decode);
  ops.impl("kv_cache_write", c10::kCPU, &metal_flash_sdpa::kv_cache_write);
  ops.impl("quantize_kv", c10::kCPU, &metal_flash_sdpa::quantize_kv);
#elif defined(METAL_KERNEL)
  ops.impl("flash_attn_varlen", c10::kMPS, &metal_flash_sdpa::flash_attn_varlen);
  ops.impl("flash_attn_varlen_backward", c10::kMPS, &metal_flash_sdpa::flash_attn_varlen_backward);
  ops.impl("flash_attn_decode", c10::kMPS, &metal_flash_sdpa::flash_attn_decode);
  ops.impl("kv_cache_write", c10::kMPS, &metal_flash_sdpa::kv_cache_write);
  ops.impl("quantize_kv", c10::kMPS, &metal_flash_sdpa::quantize_kv);
#endif
}

REGISTER_EXTENSION(TORCH_EXTENSION_NAME)
