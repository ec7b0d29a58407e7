// The paged KV write op (kv_cache_write.metal) and the cache checks it shares with the decode op, which
// appends new tokens through it. Device-agnostic like prefill.cpp.
#include "kv_cache_write.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <limits>
#include <string>
#include <tuple>
#include <utility>

#include "../torch-ext/torch_binding.h"
#include "dispatch.h"
#include "launch.h"

namespace metal_flash_sdpa {

namespace {

struct KvWriteProblem {
  ElementType dtype;
  int64_t num_seqs, seqlen_new, num_kv_heads, head_dim;
  int64_t block_size, num_blocks, blocks_per_seq;
  Strides3 k, v, k_cache, v_cache;
};

KernelLaunch plan_kv_write(const KvWriteProblem& pb, KvWriteParams* params) {
  *params = KvWriteParams{};
  copy_strides(params->k_strides, pb.k);
  copy_strides(params->v_strides, pb.v);
  copy_strides(params->k_cache_strides, pb.k_cache);
  copy_strides(params->v_cache_strides, pb.v_cache);
  params->num_seqs = int32_t(pb.num_seqs);
  params->seqlen_new = int32_t(pb.seqlen_new);
  params->num_kv_heads = int32_t(pb.num_kv_heads);
  params->head_dim = int32_t(pb.head_dim);
  params->block_size = int32_t(pb.block_size);
  params->num_blocks = int32_t(pb.num_blocks);
  params->blocks_per_seq = int32_t(pb.blocks_per_seq);

  KernelLaunch launch;
  launch.kernel = kernel_name("kv_cache_write", pb.dtype);
  launch.threadgroups[0] = uint32_t(pb.seqlen_new);
  launch.threadgroups[1] = uint32_t(pb.num_kv_heads);
  launch.threadgroups[2] = uint32_t(pb.num_seqs);
  launch.threads_per_threadgroup = KV_WRITE_THREADS;
  return launch;
}

}  // namespace

namespace {

// One cache's quantization arguments, with the names errors give them.
struct CacheArgs {
  const at::Tensor& cache;
  const char* name;            // "k_cache"
  const char* prefix;          // "k": k_scales, k_biases, k_descale
  int64_t bits;
  const std::optional<at::Tensor>& scales;
  const std::optional<at::Tensor>& biases;
  const std::optional<at::Tensor>& descale;
};

std::string arg_name(const CacheArgs& c, const char* what) { return std::string(c.prefix) + "_" + what; }

// scales / biases of an affine cache: like's dtype and device, [num_blocks, block_size, Hkv, D / group_size] with
// the groups contiguous, the biases laid out as the scales (the shaders read both at one offset).
void check_scales(const CacheArgs& c, const at::Tensor& like, const char* like_name, int64_t groups) {
  const at::Tensor& scales = *c.scales;
  const at::Tensor& biases = *c.biases;
  const std::string scales_name = arg_name(c, "scales"), biases_name = arg_name(c, "biases");
  for (const auto& [t, name] : {std::pair{&scales, &scales_name}, std::pair{&biases, &biases_name}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == like.scalar_type(), *name, " has dtype ", t->scalar_type(), " but ", like_name,
                     " has ", like.scalar_type(), "; scales and biases are in the attention dtype (as quantize_kv makes "
                     "them)");
    check_same_device(*t, like, name->c_str());
    const std::vector<int64_t> expected = {c.cache.size(0), c.cache.size(1), c.cache.size(2), groups};
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef(expected), *name, " must be [", expected[0], ", ", expected[1], ", ",
                      expected[2], ", ", groups, "] (", c.name, "'s blocks, slots and heads, head_dim / kv_group_size "
                      "groups), got shape ", t->sizes());
  }
  TORCH_CHECK_VALUE(scales.stride(-1) == 1 && biases.strides() == scales.strides(), biases_name,
                    " must have the strides of ", scales_name, " (", scales.strides(), ") with contiguous groups, got ",
                    biases.strides(), " and ", scales.strides());
}

// The cache's format and the head dim its rows hold: one cache's dtype, rank and arguments (its scales' shapes are
// checked once both caches agree).
int64_t check_one_cache(const CacheArgs& c, int64_t group_size, int64_t num_seqs, const at::Tensor& like,
                        const char* like_name, CacheQuant* quant) {
  check_same_device(c.cache, like, c.name);
  TORCH_CHECK_VALUE(c.cache.dim() == 4, c.name, " must be [num_blocks, block_size, kv_heads, head_dim] (paged) or "
                    "[batch, seqlen, kv_heads, head_dim] (contiguous), got shape ", c.cache.sizes());
  const at::ScalarType dtype = c.cache.scalar_type();
  const bool affine = dtype == at::kUInt32, fp8 = dtype == at::kFloat8_e4m3fn || dtype == at::kByte;
  const std::string scales = arg_name(c, "scales"), biases = arg_name(c, "biases"), descale = arg_name(c, "descale");
  TORCH_CHECK_VALUE(affine || (!c.scales && !c.biases), scales, " / ", biases, " are for quantized caches (uint32 "
                    "words from quantize_kv), but ", c.name, " has dtype ", dtype);
  TORCH_CHECK_VALUE(fp8 || !c.descale, descale, " is for fp8 caches (torch.float8_e4m3fn or a uint8 view), but ", c.name,
                    " has dtype ", dtype);
  TORCH_CHECK_VALUE(affine || c.bits == 0, "kv_bits gives ", c.name, " ", c.bits, "-bit codes, but it has dtype ", dtype,
                    "; a quantized cache holds torch.uint32 words (quantize_kv)");
  *quant = CacheQuant{};
  if (affine) {
    TORCH_CHECK_VALUE(c.bits == 4 || c.bits == 8, c.name, " holds packed uint32 words (a quantized cache): pass "
                      "kv_bits=(k_bits, v_bits) with 4 or 8 bits each, got ", c.prefix, "_bits = ", c.bits);
    TORCH_CHECK_VALUE(group_size == 32 || group_size == 64 || group_size == 128,
                      "kv_group_size must be 32, 64 or 128 (elements per scale and bias, as mlx.core.quantize), got ",
                      group_size);
    const int64_t head_dim = c.cache.size(3) * 32 / c.bits;
    TORCH_CHECK_VALUE(head_dim % group_size == 0, "kv_group_size ", group_size, " does not divide head_dim ", head_dim,
                      " (", c.name, " rows hold ", c.cache.size(3), " words of ", c.bits, "-bit codes)");
    TORCH_CHECK_VALUE(c.scales && c.biases, c.name, " is quantized: pass ", scales, " and ", biases,
                      " (from quantize_kv)");
    *quant = {KV_AFFINE, c.bits, group_size, *c.scales, *c.biases};
    return head_dim;
  }
  if (fp8) {
    TORCH_CHECK_VALUE(c.descale.has_value(), c.name, " is fp8 (", dtype, "): pass ", descale, " [batch, kv_heads] "
                      "(torch.float32; the cache holds x / descale)");
    const at::Tensor& d = *c.descale;
    TORCH_CHECK_TYPE(d.scalar_type() == at::kFloat, descale, " must be torch.float32, got ", d.scalar_type());
    check_same_device(d, like, descale.c_str());
    TORCH_CHECK_VALUE(d.dim() == 2 && d.size(0) == num_seqs && d.size(1) == c.cache.size(2), descale,
                      " must be [batch, kv_heads] = [", num_seqs, ", ", c.cache.size(2), "], got shape ", d.sizes());
    *quant = {KV_FP8_E4M3, 8, 0, d.contiguous(), at::Tensor()};
    return c.cache.size(3);
  }
  element_type(c.cache, c.name);
  TORCH_CHECK_TYPE(dtype == like.scalar_type(), "k_cache, v_cache and ", like_name, " must have the same dtype, got ",
                   c.name, " ", dtype, " and ", like_name, " ", like.scalar_type(), " (or be quantized: uint32 words "
                   "with kv_bits, fp8 with descales)");
  return c.cache.size(3);
}

}  // namespace

CacheGeometry check_cache(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& table,
                          bool table_is_batch_idx, const at::Tensor& like, const char* like_name,
                          const KvQuantArgs& qa, KvQuant* quant, bool v_head_dim_may_differ) {
  TORCH_CHECK_VALUE(table.dim() == 2, "block_table must be [batch, max_blocks_per_sequence], got shape ", table.sizes());
  const CacheArgs k_args{k_cache, "k_cache", "k", qa.k_bits, qa.k_scales, qa.k_biases, qa.k_descale};
  const CacheArgs v_args{v_cache, "v_cache", "v", qa.v_bits, qa.v_scales, qa.v_biases, qa.v_descale};
  const int64_t k_dim = check_one_cache(k_args, qa.group_size, table.size(0), like, like_name, &quant->k);
  const int64_t v_dim = check_one_cache(v_args, qa.group_size, table.size(0), like, like_name, &quant->v);
  const bool plain = !quant->quantized();
  TORCH_CHECK_VALUE(v_cache.sizes().slice(0, 3) == k_cache.sizes().slice(0, 3) &&
                        (v_dim == k_dim || (v_head_dim_may_differ && plain)),
                    "v_cache must have the shape of k_cache ", k_cache.sizes(), " (head_dim ", k_dim, "), got ",
                    v_cache.sizes(), " (head_dim ", v_dim, ")",
                    v_head_dim_may_differ ? "; only plain (unquantized) caches may differ in the head dim" : "");
  TORCH_CHECK_VALUE(plain || k_dim <= KV_QUANT_MAX_HEAD_DIM, "quantized caches (kv_bits or fp8) support head dims up "
                    "to ", KV_QUANT_MAX_HEAD_DIM, ", got head_dim ", k_dim, ": keep wider heads in a plain (fp16, bf16 "
                    "or fp32) cache");
  TORCH_CHECK_VALUE(k_cache.stride(-1) == 1 && v_cache.stride(-1) == 1,
                    "k_cache and v_cache need a contiguous head dim (stride 1): the cache is read and written in place");
  if (quant->k.kind == KV_AFFINE) check_scales(k_args, like, like_name, k_dim / qa.group_size);
  if (quant->v.kind == KV_AFFINE) check_scales(v_args, like, like_name, v_dim / qa.group_size);
  CacheGeometry g{k_cache.size(0), k_cache.size(1), k_cache.size(2), k_dim, table.size(0), table.size(1),
                  table_is_batch_idx, v_dim};
  // Keys of a K tile (up to one tile past the last slot) stay within the decode shader's int32.
  constexpr int64_t int_max = std::numeric_limits<int32_t>::max();
  const int64_t max_slots = int_max - KV_TILE_KEYS(g.head_dim);
  TORCH_CHECK_NOT_IMPLEMENTED(g.capacity() <= max_slots && g.num_blocks <= int_max && g.num_seqs <= int_max,
                              "caches with more than ", max_slots, " slots per sequence (head_dim ", g.head_dim,
                              "), or 2^31 - 1 blocks or sequences");
  return g;
}

void check_new_tokens(const at::Tensor& k, const at::Tensor& v, const at::Tensor& like, const CacheGeometry& g) {
  // The write kernel is chosen by the attention dtype and reads the new tokens element by element: k/v of another
  // dtype would be read with the wrong element size.
  TORCH_CHECK_TYPE(k.scalar_type() == like.scalar_type(), "k (new tokens) has dtype ", k.scalar_type(),
                   " but the cache has ", like.scalar_type(), "; convert the new tokens to the cache's (attention) dtype");
  check_same_device(k, like, "k (new tokens)");
  TORCH_CHECK_VALUE(k.dim() == 4 && k.size(0) == g.num_seqs && k.size(2) == g.num_kv_heads && k.size(3) == g.head_dim,
                    "k must be [batch, new_tokens, kv_heads, head_dim] = [", g.num_seqs, ", n, ", g.num_kv_heads, ", ",
                    g.head_dim, "], got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK_TYPE(v.scalar_type() == k.scalar_type(), "k and v must have the same dtype");
  check_same_device(v, k, "v");
  TORCH_CHECK_NOT_IMPLEMENTED(k.size(1) <= std::numeric_limits<int32_t>::max(), "more than 2^31 - 1 new tokens");
}

namespace {

void copy_format(CacheFormat* f, const CacheQuant& c) {
  *f = CacheFormat{};
  f->kind = int32_t(c.kind);
  f->bits = int32_t(c.bits);
  f->group_size = int32_t(c.group_size);
  if (c.kind == KV_AFFINE) copy_strides(f->scale_strides, token_strides(c.scales, false));
  if (c.kind == KV_FP8_E4M3) f->descale_seq_stride = int32_t(c.scales.size(1));
}

}  // namespace

KvQuantParams kv_quant_params(const KvQuant& quant) {
  KvQuantParams params{};
  copy_format(&params.k, quant.k);
  copy_format(&params.v, quant.v);
  return params;
}

std::vector<BufferBinding> kv_quant_bindings(const KvQuant& quant, const KvQuantParams& params, int first_index) {
  return {bind_optional(first_index, quant.k.scales), bind_optional(first_index + 1, quant.k.biases),
          bind_optional(first_index + 2, quant.v.scales), bind_optional(first_index + 3, quant.v.biases),
          bind_bytes(first_index + 4, params)};
}

FunctionConstant kv_quant_constant(const KvQuant& quant) { return {FC_KV_QUANTIZED, quant.quantized()}; }

namespace {

// The write kernel over `num_seqs` sequences of `k` (and `v` unless null) at cache_seqlens through the table.
void dispatch_write(const at::Tensor& k, const at::Tensor* v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const CacheIndices& indices, const CacheGeometry& g, const KvQuant& quant) {
  KvWriteProblem pb{element_type(k, "k"), g.num_seqs, k.size(1), g.num_kv_heads, g.head_dim, g.block_size,
                    g.num_blocks, g.blocks_per_seq, token_strides(k, false), token_strides(v ? *v : k, false),
                    token_strides(k_cache, false), token_strides(v_cache, false)};
  KvWriteParams params;
  KernelLaunch launch = plan_kv_write(pb, &params);
  params.write_v = v != nullptr;
  launch.constants.push_back(kv_quant_constant(quant));
  const KvQuantParams quant_params = kv_quant_params(quant);
  std::vector<BufferBinding> buffers = {
      bind_tensor(KV_WRITE_BUFFER_K, k), bind_tensor(KV_WRITE_BUFFER_V, v ? *v : k),
      bind_tensor(KV_WRITE_BUFFER_K_CACHE, k_cache), bind_tensor(KV_WRITE_BUFFER_V_CACHE, v_cache),
      bind_tensor(KV_WRITE_BUFFER_BLOCK_TABLE, indices.table),
      bind_tensor(KV_WRITE_BUFFER_CACHE_SEQLENS, indices.seqlens), bind_bytes(KV_WRITE_BUFFER_PARAMS, params)};
  for (BufferBinding& b : kv_quant_bindings(quant, quant_params, KV_WRITE_BUFFER_K_SCALES)) buffers.push_back(b);
  dispatch(launch, buffers);
}

}  // namespace

void write_new_tokens(const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, const CacheIndices& indices, const CacheGeometry& g,
                      const KvQuant& quant) {
  if (g.num_seqs == 0 || k_in.size(1) == 0 || g.num_kv_heads == 0) return;
  const at::Tensor k = unit_stride_head_dim(k_in), v = unit_stride_head_dim(v_in);
  dispatch_write(k, &v, k_cache, v_cache, indices, g, quant);
}

namespace {

// Shape checks of the KV write op, shared with its meta kernel; the index tensors as the kernel reads them.
std::pair<CacheGeometry, CacheIndices> check_kv_write_args(const at::Tensor& k, const at::Tensor& v,
                                                           const at::Tensor& k_cache, const at::Tensor& v_cache,
                                                           const at::Tensor& block_table,
                                                           const at::Tensor& cache_seqlens, const KvQuantArgs& qa,
                                                           KvQuant* quant) {
  const at::Tensor table = index_tensor(block_table, "block_table", k);
  const CacheGeometry g = check_cache(k_cache, v_cache, table, false, k, "k", qa, quant);
  check_new_tokens(k, v, k, g);
  return {g, {table, per_sequence_index(cache_seqlens, "cache_seqlens", g.num_seqs, k), at::Tensor()}};
}

// quantize_kv's outputs for x [..., D]: packed [..., D * bits / 32] uint32 words, scales and biases [..., D /
// group_size] in x's dtype (mlx.core.quantize's shapes), after the checks.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_kv_outputs(const at::Tensor& x, int64_t bits,
                                                                   int64_t group_size) {
  element_type(x, "x");
  TORCH_CHECK_VALUE(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  TORCH_CHECK_VALUE(group_size == 32 || group_size == 64 || group_size == 128,
                    "group_size must be 32, 64 or 128 (elements per scale and bias), got ", group_size);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) % group_size == 0, "x must be [..., D] with D a multiple of group_size ",
                    group_size, ", got shape ", x.sizes());
  const int64_t dim = x.size(-1);
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = dim * bits / 32;
  at::Tensor packed = at::empty(shape, x.options().dtype(at::kUInt32));
  shape.back() = dim / group_size;
  return {packed, at::empty(shape, x.options()), at::empty(shape, x.options())};
}

}  // namespace

void kv_cache_write(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                    const at::Tensor& block_table, const at::Tensor& cache_seqlens,
                    const std::optional<at::Tensor>& k_scales, const std::optional<at::Tensor>& k_biases,
                    const std::optional<at::Tensor>& v_scales, const std::optional<at::Tensor>& v_biases,
                    int64_t k_bits, int64_t v_bits, int64_t group_size, const std::optional<at::Tensor>& k_descale,
                    const std::optional<at::Tensor>& v_descale) {
  KvQuant quant;
  const auto [g, indices] = check_kv_write_args(
      k, v, k_cache, v_cache, block_table, cache_seqlens,
      {k_scales, k_biases, v_scales, v_biases, k_bits, v_bits, group_size, k_descale, v_descale}, &quant);
  if (data_checks_enabled(k)) check_cache_indices(indices, k.size(1), false, g);
  write_new_tokens(k, v, k_cache, v_cache, indices, g, quant);
}

void kv_cache_write_meta(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                         const at::Tensor& block_table, const at::Tensor& cache_seqlens,
                         const std::optional<at::Tensor>& k_scales, const std::optional<at::Tensor>& k_biases,
                         const std::optional<at::Tensor>& v_scales, const std::optional<at::Tensor>& v_biases,
                         int64_t k_bits, int64_t v_bits, int64_t group_size,
                         const std::optional<at::Tensor>& k_descale, const std::optional<at::Tensor>& v_descale) {
  KvQuant quant;
  check_kv_write_args(k, v, k_cache, v_cache, block_table, cache_seqlens,
                      {k_scales, k_biases, v_scales, v_biases, k_bits, v_bits, group_size, k_descale, v_descale},
                      &quant);
}

// The write kernel on x viewed as a contiguous cache of one sequence: rows [N, D] are N new tokens of one KV head
// written at slots 0..N-1, K only.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_kv(const at::Tensor& x, int64_t bits, int64_t group_size) {
  auto [packed, scales, biases] = quantize_kv_outputs(x, bits, group_size);
  const int64_t dim = x.size(-1), rows = dim == 0 ? 0 : x.numel() / dim;
  // Rows are the write kernel's tokens and D its head dim: int32 there (the meta kernel cannot count them).
  TORCH_CHECK_NOT_IMPLEMENTED(dim <= std::numeric_limits<int32_t>::max() && rows <= std::numeric_limits<int32_t>::max(),
                              "quantize_kv of more than 2^31 - 1 rows or elements per row");
  if (rows == 0) return {packed, scales, biases};
  const at::Tensor tokens = unit_stride_head_dim(x).reshape({1, rows, 1, dim});
  const at::Tensor cache = packed.view({1, rows, 1, dim * bits / 32});
  KvQuant quant;
  quant.k = {KV_AFFINE, bits, group_size, scales.view({1, rows, 1, dim / group_size}),
             biases.view({1, rows, 1, dim / group_size})};
  const at::Tensor zero = at::zeros({1, 1}, x.options().dtype(at::kInt));
  const CacheGeometry g{1, rows, 1, dim, 1, 1, true};
  dispatch_write(tokens, nullptr, cache, cache, {zero, zero.view({1}), at::Tensor()}, g, quant);
  return {packed, scales, biases};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_kv_meta(const at::Tensor& x, int64_t bits,
                                                                int64_t group_size) {
  return quantize_kv_outputs(x, bits, group_size);
}

}  // namespace metal_flash_sdpa
