#pragma once
#import <Metal/Metal.h>
typedef struct dispatch_queue_s* dispatch_queue_t;
namespace at::mps {
class MPSStream {
 public:
  dispatch_queue_t queue() const;
  id<MTLComputeCommandEncoder> commandEncoder();
  id<MTLDevice> device() const;
};
MPSStream* getCurrentMPSStream();
void dispatch_sync_with_rethrow(dispatch_queue_t queue, void (^block)());
}  // namespace at::mps
