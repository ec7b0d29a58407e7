// dispatch() for the CPU build: runs the unmodified shaders in the mslsim simulator (linked into this
// extension) on CPU tensors, and keeps a running tally of the work they did for tests and benchmarks
// (the simulator_counters op, registered here: only this build has it).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

#include "dispatch.h"
#include "index_checks.h"
#include "mslsim/runtime.h"

namespace metal_flash_sdpa {

namespace {

std::mutex g_counters_mutex;
std::map<std::string, int64_t> g_counters;

int env_int(const char* name, int fallback) {
  const char* value = std::getenv(name);
  return value && *value ? std::atoi(value) : fallback;
}

// Bytes from the tensor's first element to one past its last (a strided view spans its whole extent).
uint64_t byte_extent(const at::Tensor& t) {
  if (t.numel() == 0) return 0;
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return uint64_t(last + 1) * t.element_size();
}

void tally(const std::string& kernel, const MslsimStats& stats) {
  std::lock_guard<std::mutex> lock(g_counters_mutex);
  g_counters["launches"] += 1;
  g_counters["threadgroups"] += int64_t(stats.threadgroups);
  for (int i = 0; i < MSLSIM_MAX_BUFFERS; ++i) {
    if (stats.device_bytes_read[i]) {
      g_counters["device_bytes_read"] += int64_t(stats.device_bytes_read[i]);
      g_counters["device_bytes_read[" + std::to_string(i) + "]"] += int64_t(stats.device_bytes_read[i]);
    }
    if (stats.device_bytes_written[i]) {
      g_counters["device_bytes_written"] += int64_t(stats.device_bytes_written[i]);
      g_counters["device_bytes_written[" + std::to_string(i) + "]"] += int64_t(stats.device_bytes_written[i]);
    }
  }
  for (uint32_t i = 0; i < stats.num_counters; ++i) g_counters[mslsim_counter_name(int(i))] += int64_t(stats.counters[i]);
  if (!stats.profiled) return;
  // MSLSIM_PROFILE=1: executed-instruction profile per kernel, "profile[<kernel>].<counter>" (mslsim/README.md)
  const std::string prefix = "profile[" + kernel + "].";
  g_counters[prefix + "launches"] += 1;
  g_counters[prefix + "threadgroups"] += int64_t(stats.threadgroups);
  g_counters[prefix + "threads_per_threadgroup"] = stats.threads_per_threadgroup;
  int64_t& memory = g_counters[prefix + "threadgroup_memory"];
  memory = std::max<int64_t>(memory, stats.threadgroup_memory_peak);
  for (int i = 0; i < MSLSIM_NUM_PROFILE_COUNTERS; ++i)
    g_counters[prefix + mslsim_profile_counter_name(i)] += int64_t(stats.profile[i]);
}

}  // namespace

// The profile's GPUs (benchmarks/cost_model.py: M3 Max and M4 Max, 40 cores each), so the simulated plan is the
// one those Macs run.
int64_t gpu_core_count() { return 40; }

void dispatch(const KernelLaunch& launch, const std::vector<BufferBinding>& buffers) {
  static char empty_buffer;   // bound for empty tensors: any access is out of bounds, as on a GPU
  MslsimLaunch desc{};
  desc.kernel = launch.kernel.c_str();
  for (int i = 0; i < 3; ++i) desc.threadgroups[i] = launch.threadgroups[i];
  desc.threads[0] = launch.threads_per_threadgroup;
  desc.threads[1] = desc.threads[2] = 1;
  for (const BufferBinding& b : buffers) {
    MslsimBuffer& slot = desc.buffers[b.index];
    if (b.tensor) {
      TORCH_CHECK(b.tensor->device().is_cpu(), "the simulator build runs on CPU tensors, got ", b.tensor->device());
      slot.size = byte_extent(*b.tensor);
      slot.data = slot.size ? b.tensor->data_ptr() : &empty_buffer;
    } else {
      slot.data = const_cast<char*>(b.bytes.data());
      slot.size = b.bytes.size();
    }
  }
  std::vector<MslsimConstant> constants;
  for (const FunctionConstant& c : launch.constants) {
    MslsimConstant mc{};
    mc.index = c.index;
    mc.type = MSLSIM_BOOL;
    mc.value[0] = c.value;
    constants.push_back(mc);
  }
  desc.constants = constants.data();
  desc.num_constants = int32_t(constants.size());
  // Simulator knobs for debugging sessions; the defaults check everything.
  desc.workers = env_int("MSLSIM_WORKERS", 0);
  desc.schedule = env_int("MSLSIM_SCHEDULE", MSLSIM_FORWARD);
  desc.seed = uint32_t(env_int("MSLSIM_SEED", 0));
  desc.check_threadgroup = env_int("MSLSIM_CHECK_THREADGROUP", 1);

  MslsimStats stats{};
  char error[2048];
  const int status = mslsim_dispatch(&desc, &stats, error, sizeof(error));
  TORCH_CHECK(status == 0, "metal-flash-sdpa (simulated Metal): ", error);
  tally(launch.kernel, stats);
}

// Launches, threadgroups, device bytes read/written (total and per [[buffer(i)]]) and the shaders'
// WORK_COUNT counters, summed since the last reset; plus the host reads of index data (index_checks.h).
c10::Dict<std::string, int64_t> simulator_counters(bool reset) {
  std::lock_guard<std::mutex> lock(g_counters_mutex);
  c10::Dict<std::string, int64_t> snapshot;
  for (const auto& [name, value] : g_counters) snapshot.insert(name, value);
  snapshot.insert("host_index_reads", reset ? host_index_reads().exchange(0) : host_index_reads().load());
  if (reset) g_counters.clear();
  return snapshot;
}

}  // namespace metal_flash_sdpa

TORCH_LIBRARY_FRAGMENT(TORCH_EXTENSION_NAME, ops) {
  ops.def("simulator_counters(bool reset=False) -> Dict(str, int)", &metal_flash_sdpa::simulator_counters);
}
