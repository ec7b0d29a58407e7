// MLX's tiled attention kernel (mlx/backend/metal/kernels/steel/attn/kernels/steel_attention.h, fetched from
// the mlx-metal wheel by scripts/fetch_mlx_metal.py), instantiated as MLX's steel_attention.metal names it:
// third-party MSL known to run on Apple GPUs.
#include <metal_stdlib>
#include "mlx/backend/metal/kernels/utils.h"
#include "mlx/backend/metal/kernels/steel/attn/kernels/steel_attention.h"

using namespace metal;

#define instantiate_attention(type, bk, dim, mask)                                                       \
  instantiate_kernel("steel_attention_" #type "_bq32_bk" #bk "_bd" #dim "_wm4_wn1_mask" #mask, attention, \
                     type, 32, bk, dim, dim, 4, 1, mask, float)

instantiate_attention(float, 32, 64, float)
instantiate_attention(half, 16, 128, half)
instantiate_attention(bfloat16_t, 32, 64, bfloat16_t)
// the profile cases (benchmarks/instrument.py): fp16 at D = 64 (with MLX's boolean mask for windows) and D = 256
instantiate_attention(half, 32, 64, half)
instantiate_attention(half, 32, 64, bool)
instantiate_attention(half, 16, 256, half)
