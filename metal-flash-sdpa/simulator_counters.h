// Work done by simulated launches (CPU build only): launches, threadgroups, device bytes read/written
// (total and per [[buffer(i)]]) and the shaders' WORK_COUNT counters, summed since the last reset; plus
// host_index_reads, the ops' host reads of index data (host_ints in index_checks.h).
#pragma once
#include <stdint.h>

#include <map>
#include <string>

namespace metal_flash_sdpa {

std::map<std::string, int64_t> simulator_counters(bool reset);

}  // namespace metal_flash_sdpa
