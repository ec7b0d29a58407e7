// MLX's single-query attention kernel (mlx/backend/metal/kernels/sdpa_vector.h, fetched from the
// mlx-metal wheel by scripts/fetch_mlx_metal.py), instantiated as MLX's scaled_dot_product_attention.metal
// names it: third-party MSL known to run on Apple GPUs.
#include <metal_stdlib>
#include "mlx/backend/metal/kernels/utils.h"
#include "mlx/backend/metal/kernels/sdpa_vector.h"

using namespace metal;

#define instantiate_sdpa_vector(type, dim) \
  instantiate_kernel("sdpa_vector_" #type "_" #dim "_" #dim, sdpa_vector, type, dim, dim)

instantiate_sdpa_vector(float, 64)
instantiate_sdpa_vector(half, 128)
instantiate_sdpa_vector(bfloat16_t, 64)

// The 2-pass decode kernels MLX routes long contexts to (scaled_dot_product_attention.cpp, sdpa_vector_2pass).
#define instantiate_sdpa_vector_2pass(type, dim)                                                           \
  instantiate_kernel("sdpa_vector_2pass_1_" #type "_" #dim "_" #dim, sdpa_vector_2pass_1, type, dim, dim) \
  instantiate_kernel("sdpa_vector_2pass_2_" #type "_" #dim, sdpa_vector_2pass_2, type, dim)

instantiate_sdpa_vector_2pass(half, 128)
instantiate_sdpa_vector_2pass(float, 64)

// MLX's duplication-free pass 1 for single-query GQA decode (sdpa_vector.h, sdpa_vector_2pass_1_gqa<T, D, V, G, HPT>):
// named as scaled_dot_product_attention.cpp's sdpa_vector_2pass builds the name ("sdpa_vector_2pass_1_gqa_<G>_..."),
// HPT (query heads per simdgroup) as in MLX's own instantiations: (64, 64, 8, 8), (128, 128, 8, 4), (128, 128, 12, 4),
// (128, 128, 16, 2). Its pass 2 is the generic sdpa_vector_2pass_2 above.
#define instantiate_sdpa_vector_2pass_gqa(type, dim, G, HPT)                                       \
  instantiate_kernel("sdpa_vector_2pass_1_gqa_" #G "_" #type "_" #dim "_" #dim, sdpa_vector_2pass_1_gqa, \
                     type, dim, dim, G, HPT)

instantiate_sdpa_vector_2pass_gqa(half, 128, 8, 4)
instantiate_sdpa_vector_2pass_gqa(float, 64, 8, 8)
