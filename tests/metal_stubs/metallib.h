#pragma once
#import <Metal/Metal.h>
// What kernel-builder's EMBEDDED_METALLIB_HEADER provides.
#define EMBEDDED_METALLIB_NAMESPACE metal_flash_sdpa_metallib
namespace metal_flash_sdpa_metallib {
id<MTLLibrary> createLibrary(id<MTLDevice> device, NSError** error);
}
