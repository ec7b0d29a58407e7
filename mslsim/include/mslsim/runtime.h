// mslsim runtime interface.
//
// Two audiences:
//  * the C ABI (extern "C", MSLSIM_API) used by Python (ctypes) and by the simulator-backed torch ops:
//    describe a launch, dispatch it, read its statistics;
//  * the internal C++ API (namespace mslsim::rt) that the shim (shim.h) calls from inside kernels.
// Only <stdint.h>/<stddef.h> are included so the kernel translation unit's namespace stays clean.
#pragma once
#include <stddef.h>
#include <stdint.h>

#define MSLSIM_MAX_BUFFERS 31        // Metal: [[buffer(0..30)]]
#define MSLSIM_MAX_COUNTERS 16       // named work counters per library
#define MSLSIM_SIMD_WIDTH 32         // Apple GPUs
#define MSLSIM_MAX_THREADS 1024      // Metal: maxTotalThreadsPerThreadgroup
#define MSLSIM_MAX_THREADGROUP_MEMORY 32768   // Metal: maxThreadgroupMemoryLength on Apple GPUs
#define MSLSIM_API extern "C" __attribute__((visibility("default")))

// Profile counters (a launch with profile=1 runs each kernel's GPU-numerics twin, which counts; see build.py). Every count is per
// GPU thread (a lane): an instruction a full simdgroup executes counts 32. Memory instructions by access width
// (bytes; "other": whole-struct copies and fills), counted from the traced loads and stores (loads from buffers
// bound to `constant` kernel arguments count as constant loads, not device loads); the accesses a
// simdgroup_load/simdgroup_store makes count as one matrix load/store of the lane instead. The arithmetic
// classes are basic-block execution counts times each block's LLVM IR instruction mix (kernel code only, see
// build.py): LLVM IR, an approximation of Apple's ISA. MSLSIM_ARITHMETIC_CLASSES is read by build.py (one list).
#define MSLSIM_MEMORY_COUNTERS(X, space) \
  X(space##_1) X(space##_2) X(space##_4) X(space##_8) X(space##_16) X(space##_other) X(space##_bytes)
#define MSLSIM_ARITHMETIC_CLASSES(X) \
  X(fp32) X(fp16) X(int32_add) X(int32_mul) X(int64_add) X(int64_mul) X(int_div) X(convert) X(transcendental) \
  X(compare_select) X(branch)
#define MSLSIM_PROFILE_COUNTERS(X)                                                                        \
  MSLSIM_MEMORY_COUNTERS(X, device_load) MSLSIM_MEMORY_COUNTERS(X, device_store)                           \
  MSLSIM_MEMORY_COUNTERS(X, constant_load)                                                                \
  MSLSIM_MEMORY_COUNTERS(X, threadgroup_load) MSLSIM_MEMORY_COUNTERS(X, threadgroup_store)                 \
  X(matrix_load_device) X(matrix_load_threadgroup) X(matrix_store_device) X(matrix_store_threadgroup)      \
  X(matrix_multiply_accumulate) X(simd_function) X(threadgroup_barrier) X(simdgroup_barrier)              \
  MSLSIM_ARITHMETIC_CLASSES(X)
#define MSLSIM_ENUM_(name) MSLSIM_PROFILE_##name,
enum MslsimProfileCounter { MSLSIM_PROFILE_COUNTERS(MSLSIM_ENUM_) MSLSIM_NUM_PROFILE_COUNTERS };
#define MSLSIM_ONE_(name) +1
enum { MSLSIM_NUM_ARITHMETIC_CLASSES = 0 MSLSIM_ARITHMETIC_CLASSES(MSLSIM_ONE_) };

extern "C" {

// Scalar types a function constant may have (MTLDataType subset).
enum MslsimType : int32_t {
  MSLSIM_BOOL = 1, MSLSIM_INT = 2, MSLSIM_UINT = 3, MSLSIM_FLOAT = 4, MSLSIM_HALF = 5,
  MSLSIM_SHORT = 6, MSLSIM_USHORT = 7, MSLSIM_CHAR = 8, MSLSIM_UCHAR = 9,
};

struct MslsimBuffer {
  void* data;       // host memory (copied into guarded simulator memory for the launch, copied back after)
  uint64_t size;    // bytes the kernel may touch; any access outside [data, data+size) is an error
};

struct MslsimConstant {   // one MTLFunctionConstantValues entry
  int32_t index;
  int32_t type;           // MslsimType
  uint8_t value[8];       // little-endian value of the declared type
};

enum MslsimSchedule : int32_t {   // order in which ready fibers run between synchronisation points
  MSLSIM_FORWARD = 0, MSLSIM_REVERSE = 1, MSLSIM_RANDOM = 2,
};

struct MslsimLaunch {
  const char* kernel;
  uint32_t threadgroups[3];                           // dispatchThreadgroups: threadgroups per grid
  uint32_t threads[3];                                // threads per threadgroup
  MslsimBuffer buffers[MSLSIM_MAX_BUFFERS];           // setBuffer / setBytes by index (data == NULL: unbound)
  uint32_t threadgroup_memory[MSLSIM_MAX_BUFFERS];    // setThreadgroupMemoryLength by [[threadgroup(i)]] index
  const MslsimConstant* constants;
  int32_t num_constants;
  int32_t workers;            // OS threads running threadgroups concurrently (0: one per core, max 2 here)
  int32_t schedule;           // MslsimSchedule
  uint32_t seed;              // for MSLSIM_RANDOM
  int32_t check_threadgroup;  // 1: detect races (threadgroup and device memory) and uninitialised threadgroup reads
  int32_t gpu_numerics;       // 1: run the kernels' GPU-numerics twins (also chosen by MSLSIM_GPU_NUMERICS=1)
  int32_t profile;            // 1: run the GPU-numerics twins and fill MslsimStats.profile with their counts
                              //    (also chosen by MSLSIM_PROFILE=1)
  // Run only these threadgroups (linear ids x + X * (y + Y * z)); the others are skipped and write nothing.
  // NULL: the whole grid, or the ids listed (comma-separated) in the environment variable MSLSIM_THREADGROUPS.
  const uint64_t* threadgroup_subset;
  uint64_t num_threadgroup_subset;
};

struct MslsimStats {
  uint64_t threadgroups;
  uint64_t fiber_switches;
  uint64_t threadgroup_barriers;     // per thread arrival
  uint64_t simd_collectives;         // per lane arrival
  uint64_t device_bytes_read[MSLSIM_MAX_BUFFERS];
  uint64_t device_bytes_written[MSLSIM_MAX_BUFFERS];
  uint64_t threadgroup_bytes_read;
  uint64_t threadgroup_bytes_written;
  uint32_t threadgroup_memory_peak;  // bytes of threadgroup memory one threadgroup used
  uint32_t num_counters;
  uint64_t counters[MSLSIM_MAX_COUNTERS];  // named work counters (names: mslsim_counter_name)
  uint32_t profiled;                       // 1: the launch profiled and `profile` holds the counts
  uint32_t threads_per_threadgroup;
  uint64_t profile[MSLSIM_NUM_PROFILE_COUNTERS];   // MslsimProfileCounter (names: mslsim_profile_counter_name)
};

// Returns 0 on success; otherwise writes a message naming the kernel, threadgroup and thread into err.
MSLSIM_API int mslsim_dispatch(const MslsimLaunch* launch, MslsimStats* stats, char* err, size_t err_len);

// Library introspection (what this shared object's kernels declare).
MSLSIM_API int mslsim_num_kernels(void);
MSLSIM_API const char* mslsim_kernel_name(int i);
MSLSIM_API int mslsim_num_function_constants(void);
MSLSIM_API int mslsim_function_constant(int i, int32_t* index, int32_t* type, const char** name);
MSLSIM_API const char* mslsim_counter_name(int i);
MSLSIM_API const char* mslsim_profile_counter_name(int i);
}

namespace mslsim {
namespace rt {

struct uint3_ { uint32_t x, y, z; };

// Per GPU-thread state; the shim reads the attribute values ([[thread_position_in_grid]], ...) from here.
struct ThreadContext {
  uint3_ thread_position_in_threadgroup, threadgroup_position_in_grid, thread_position_in_grid;
  uint3_ threads_per_threadgroup, threadgroups_per_grid;
  uint32_t thread_index_in_threadgroup, lane, simdgroup, simdgroups_per_threadgroup;
};
extern __thread ThreadContext* current __attribute__((tls_model("initial-exec")));

// Result of one round of SIMD-group functions: every waiting lane's value, and for each lane the set of
// lanes that executed the same call with it (Metal's active lanes: lanes in other branches of divergent
// code form their own set, lanes that returned are in none). Reductions are computed once per set and
// cached under the set's lowest lane.
struct SimdExchange {
  alignas(64) unsigned char slot[MSLSIM_SIMD_WIDTH][32];
  unsigned char result[MSLSIM_SIMD_WIDTH][32];
  uint32_t participants[MSLSIM_SIMD_WIDTH];
  uint32_t has_result;   // bit l: result[l] holds the reduction of the set whose lowest lane is l
};

// mem_flags bits as the shim passes them (metal::mem_flags values).
enum MemFlags : int { MEM_DEVICE = 1, MEM_THREADGROUP = 2 };

[[noreturn]] __attribute__((format(printf, 1, 2))) void fail(const char* fmt, ...);

// How a kernel argument uses its buffer: read-only device memory, writable device memory (race-checked), or the
// `constant` address space (read-only, served by the constant cache: counted as constant loads in the profile).
enum BufferUse : int { BUFFER_READ = 0, BUFFER_WRITE = 1, BUFFER_CONSTANT = 2 };
void* bind_buffer(int index, size_t bytes_needed, bool is_reference, BufferUse use);
void* bind_threadgroup_arg(int index);
// What a [[function_constant]] reference argument that does not exist refers to: zeros, readable because the
// compiler may hoist a load through a reference above the branch that guards it.
void* absent_argument();
void* threadgroup_variable(const void* key, size_t size, size_t align, const char* name);
// Synchronisation points: `convergent` (like GPU barriers) so the optimiser never duplicates or merges
// their calls; the runtime tells calls apart by call path.
__attribute__((convergent)) void threadgroup_barrier(int mem_flags, const char* file, unsigned line);
__attribute__((convergent)) void simdgroup_barrier(int mem_flags, const char* file, unsigned line);
__attribute__((convergent)) SimdExchange* simd_exchange(const void* value, size_t bytes, const char* file, unsigned line);

int register_kernel(const char* name, void (*entry)(), int gpu_numerics);
int register_function_constant(int index, int type, void* value, bool* defined, const char* name);
[[noreturn]] void function_constant_not_set(const char* name);
uint64_t launch_serial();   // changes with every launch: per-pipeline values are recomputed per launch
void note_atomic(const void* address, size_t bytes);   // atomics are untraced; they report here
int work_counter(const char* name);
// GPU twins only (shim.h): a matrix load/store's element accesses (between begin and end) count as one
// matrix instruction; the other operations count themselves.
void profile_matrix_access(int kind);   // kind: 1 load, 2 store, 0 end
void profile_count(int counter);
void work_count(int counter, uint64_t amount);

}  // namespace rt
}  // namespace mslsim
