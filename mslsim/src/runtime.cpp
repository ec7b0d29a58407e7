// mslsim runtime: executes shimmed MSL compute kernels on the CPU.
//
// Execution model. A launch runs its threadgroups on up to `workers` OS threads. Inside a threadgroup
// every GPU thread is a cooperative fiber; fibers switch only at threadgroup_barrier, simdgroup_barrier
// and SIMD-group collectives, so code between two synchronisation points runs uninterrupted, like a
// warp between two barriers.
//
// Memory model. Every device buffer (aliasing views of one allocation share one) and every threadgroup
// array gets its own "slot": a 64 GiB stretch of reserved, inaccessible address space with the data at its
// centre. Kernel code is compiled with clang's load/store tracing (-fsanitize-coverage=trace-loads,
// trace-stores; aggregate copies are rerouted through traced memcpy, see build.py), so every access passes
// through on_access(): an address inside a slot but outside its data is an out-of-bounds access of exactly
// that buffer or array, however far off (up to +-32 GiB; beyond, the address is unmapped and faults). Bytes
// read/written are counted per buffer. Threadgroup arrays and buffers the kernel may write have a shadow
// that flags uninitialised threadgroup reads and accesses by two threads of a threadgroup that no barrier
// orders (races), honouring the barrier's mem_flags.
//
// Errors. fail() records a message naming the kernel, threadgroup and thread, and leaves the fiber for
// good; the launch returns the message. A SIGSEGV/SIGBUS inside kernel code (wild pointer, fiber stack
// overflow) is turned into the same kind of error instead of killing the process.
#include "mslsim/runtime.h"

#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <vector>

#if !defined(__x86_64__)
#error "mslsim's fiber switch is written for x86-64"
#endif

namespace mslsim {
namespace rt {

__thread ThreadContext* current __attribute__((tls_model("initial-exec")));

// ------------------------------------------------------------------------------------------ fiber switch
// x86-64 SysV: push callee-saved registers and the SSE/x87 control words on the old stack, swap rsp.
extern "C" void mslsim_switch(void** save_sp, void* new_sp);
extern "C" void mslsim_trampoline();
__asm__(
    ".text\n.p2align 4\n.hidden mslsim_switch\n.globl mslsim_switch\n.type mslsim_switch,@function\n"
    "mslsim_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  subq $8, %rsp\n  stmxcsr (%rsp)\n  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n  fldcw 4(%rsp)\n  addq $8, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size mslsim_switch,.-mslsim_switch\n"
    ".p2align 4\n.hidden mslsim_trampoline\n.globl mslsim_trampoline\n.type mslsim_trampoline,@function\n"
    "mslsim_trampoline:\n  movq %r13, %rdi\n  callq *%r12\n  ud2\n"
    ".size mslsim_trampoline,.-mslsim_trampoline\n");

// ------------------------------------------------------------------------------------------ registries
// Filled by static initialisers of the kernel translation units: plain zero-initialised arrays.
struct KernelEntry { const char* name; void (*entry)(); };
struct ConstantEntry { int index, type; void* value; bool* defined; const char* name; };
static KernelEntry g_kernels[2][256];   // [0]: exact numerics, [1]: GPU-numerics twins (which also profile)
static int g_num_kernels[2];
static ConstantEntry g_constants[256];
static int g_num_constants;
static const char* g_counter_names[MSLSIM_MAX_COUNTERS];
static int g_num_counters;

int register_kernel(const char* name, void (*entry)(), int gpu_numerics) {
  int& count = g_num_kernels[gpu_numerics];
  if (count < 256) g_kernels[gpu_numerics][count++] = {name, entry};
  return 0;
}
int register_function_constant(int index, int type, void* value, bool* defined, const char* name) {
  if (g_num_constants < 256) g_constants[g_num_constants++] = {index, type, value, defined, name};
  return 0;
}
int work_counter(const char* name) {
  for (int i = 0; i < g_num_counters; i++)
    if (!strcmp(g_counter_names[i], name)) return i;
  if (g_num_counters == MSLSIM_MAX_COUNTERS) return -1;
  g_counter_names[g_num_counters] = name;
  return g_num_counters++;
}

// ------------------------------------------------------------------------------------------ launch state
// Slots: each buffer group and each threadgroup array owns 2^kSlotBits bytes of reserved address space with
// its data at the centre, so the slot an address falls in says which buffer / array the access was meant
// for, however far out of bounds it is.
static const int kSlotBits = 36;
static const uintptr_t kSlot = uintptr_t(1) << kSlotBits;
static const size_t kPage = 4096;
struct ShadowByte;
struct Region {              // one group of (possibly aliasing) bound buffers, alone in its slot
  uintptr_t lo, hi;          // accessible bytes [lo, hi)
  unsigned char* host;       // where they came from
  int first_index;           // buffer index the bytes are counted against and errors name
  ShadowByte* shadow;        // race-checker state per byte (reserved, touched only if `writable`)
  size_t shadow_len;
  volatile bool writable;    // bound to a non-const pointer or reference: may be written, so race-checked
  // Bound to `constant` arguments (BUFFER_CONSTANT) / to device ones: a region bound only as constant is in the
  // constant address space (read-only; its reads are constant-cache loads in the profile).
  volatile bool bound_constant, bound_device;
};
static inline bool constant_space(const Region& r) { return r.bound_constant && !r.bound_device; }
struct Binding { unsigned char* sim; uint64_t size; int region; };

static pthread_mutex_t g_dispatch_lock = PTHREAD_MUTEX_INITIALIZER;
static const MslsimLaunch* g_launch;
static uint64_t g_launch_serial;
// The threadgroups a launch runs (MslsimLaunch.threadgroup_subset): NULL for the whole grid.
static const uint64_t* g_selected;
static uint64_t g_num_selected;
static Binding g_bindings[MSLSIM_MAX_BUFFERS];
static Region g_regions[MSLSIM_MAX_BUFFERS];
static int g_num_regions;
static uintptr_t g_window_lo, g_window_span;   // the device slots
static unsigned char* g_window;
static volatile int g_abort;     // set by the first failing worker so the others stop early

// ------------------------------------------------------------------------------------------ workers
struct Fiber { void* sp; ThreadContext ctx; bool done; };
// Memory kinds the race checker orders separately (a barrier's mem_flags say which it orders).
enum MemoryKind { THREADGROUP_MEMORY = 0, DEVICE_MEMORY = 1 };
struct SimdGroup {
  uint32_t live;               // lanes that have not returned
  int running;                 // live lanes not waiting at a SIMD-group function or barrier
  uint32_t waiting;            // lanes waiting at a SIMD-group function / simdgroup_barrier
  uint32_t barrier_lanes;      // those of them at a simdgroup_barrier
  unsigned generation;         // bumps when the waiting lanes are released
  unsigned round;              // buffer the waiting lanes deposit into: buf[round & 1]
  uint32_t epoch[2];           // ordering interval per MemoryKind for the race checker
  uint64_t path[MSLSIM_SIMD_WIDTH];   // call path of each waiting lane's call
  int flags[MSLSIM_SIMD_WIDTH];       // mem_flags of each lane's simdgroup_barrier
  // A released lane reads buf[r & 1] while faster lanes deposit for round r + 1 into the other buffer;
  // round r + 2 cannot start before every lane of round r has run again, so two buffers suffice.
  SimdExchange buf[2];
};
// A kernel-scope threadgroup array (or [[threadgroup(i)]] allocation) in its slot.
struct ThreadgroupArray {
  const void* key;             // identity of the declaration (null for [[threadgroup(i)]])
  uintptr_t base;              // first byte (centre of the slot)
  size_t size, packed;         // bytes; offset in the packed 32 KiB budget (and the shadow)
  const char* name;            // null: slot unused in this threadgroup
};
static const int kMaxArrays = 64;                                    // kernel-scope arrays: slots 0..63
static const int kThreadgroupSlots = kMaxArrays + MSLSIM_MAX_BUFFERS;  // then [[threadgroup(i)]]
// Race-checker state of one byte.
struct ShadowByte {
  uint32_t write_epoch, write_simd_epoch, read_epoch, read_simd_epoch;   // read_epoch 0: not read yet
  uint16_t writer, reader;         // thread indices; reader == kManyReaders: several threads read it
  uint16_t reader_simdgroup;       // kManyReaders: readers from several simdgroups
  uint8_t initialized, pad_;
};
static const uint16_t kManyReaders = 0xFFFF;

struct alignas(64) Worker {
  int id;
  Fiber* fibers = nullptr;
  int capacity = 0, count = 0;
  char* stacks = nullptr;
  size_t stacks_len = 0;
  int current = 0, alive = 0;
  int* order = nullptr;
  int* position = nullptr;
  uint64_t rng = 0;
  void* main_sp = nullptr;
  bool in_kernel = false;
  sigjmp_buf escape;           // target of the fault handler
  // threadgroup barrier
  int tg_arrived = 0;
  unsigned tg_generation = 0;
  uint64_t tg_path = 0;
  int tg_flags = 0;
  const char* tg_file = nullptr;
  unsigned tg_line = 0;
  long spins = 0;
  uint32_t epoch[2] = {};      // ordering interval per MemoryKind (device stamps are unique per worker)
  uint32_t device_intervals = 0;
  SimdGroup* simdgroups = nullptr;
  int num_simdgroups = 0, simdgroup_capacity = 0;
  // threadgroup memory
  unsigned char* tg_window = nullptr;   // kThreadgroupSlots slots
  size_t packed_used = 0;               // bytes of the 32 KiB budget in use
  ThreadgroupArray arrays[kThreadgroupSlots];
  int num_vars = 0;
  ShadowByte* shadow = nullptr;         // by packed offset
  bool check = false;
  // profiling (profile=1): the kind of matrix access in progress (1 load, 2 store, 0 none), and whether its
  // first element access was seen (which names the matrix instruction's address space)
  bool profiling = false;
  int matrix_kind = 0;
  bool matrix_counted = false;
  // results
  bool failed = false;
  char message[1536];
  MslsimStats stats;
};
static __thread Worker* g_worker __attribute__((tls_model("initial-exec")));
static const size_t kStackSize = 256 * 1024;
static const size_t kArenaSize = MSLSIM_MAX_THREADGROUP_MEMORY;

static void describe_thread(char* out, size_t n) {
  const ThreadContext* c = current;
  if (!c) { snprintf(out, n, "kernel '%s'", g_launch ? g_launch->kernel : "?"); return; }
  snprintf(out, n, "kernel '%s', threadgroup (%u,%u,%u), thread %u (simdgroup %u, lane %u)", g_launch->kernel,
           c->threadgroup_position_in_grid.x, c->threadgroup_position_in_grid.y, c->threadgroup_position_in_grid.z,
           c->thread_index_in_threadgroup, c->simdgroup, c->lane);
}

void fail(const char* fmt, ...) {
  Worker* w = g_worker;
  char where[256];
  describe_thread(where, sizeof where);
  int k = snprintf(w->message, sizeof w->message, "%s: ", where);
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(w->message + k, sizeof w->message - k, fmt, ap);
  va_end(ap);
  w->failed = true;
  g_abort = 1;
  mslsim_switch(&w->fibers[w->current].sp, w->main_sp);   // never resumed
  __builtin_trap();
}

// ------------------------------------------------------------------------------------------ scheduling
static inline void switch_to(Worker* w, int next) {
  int prev = w->current;
  w->current = next;
  current = &w->fibers[next].ctx;
  w->stats.fiber_switches++;
  mslsim_switch(&w->fibers[prev].sp, w->fibers[next].sp);
}
static inline int next_alive(Worker* w) {
  int n = w->count, p0 = w->position[w->current], p = p0, j;
  do {
    if (++p == n) p = 0;
    j = w->order[p];
  } while (w->fibers[j].done && p != p0);
  return j;
}
// Yield until *generation changes. If every live fiber keeps yielding without progress, the threads
// wait for each other forever: on a GPU that is a hang, here it is an error.
static void wait_for(Worker* w, unsigned* generation, unsigned seen, const char* what, const char* file, unsigned line) {
  while (*generation == seen) {
    if (++w->spins > 2L * w->alive + 4)
      fail("deadlock at %s (%s:%u): the threads of this threadgroup wait for each other forever", what, file, line);
    int j = next_alive(w);
    if (j != w->current) switch_to(w, j);
  }
}
// The dynamic call path of a barrier or SIMD-group call: its source line and the return addresses of
// every call from the kernel entry down to the runtime. A barrier in a helper called (or inlined) in two
// branches is then two different barriers, as on the GPU. Kernel code and the runtime keep frame pointers
// (build.py), the runtime entry points are `convergent` so the compiler does not duplicate or merge their
// calls, and the chain ends at the fiber's first frame (rbp = 0).
static inline __attribute__((always_inline)) uint64_t call_path(const char* file, unsigned line) {
  Worker* w = g_worker;
  const uintptr_t lo = (uintptr_t)w->stacks + (kStackSize + kPage) * w->current, hi = lo + kStackSize + kPage;
  uint64_t h = (uintptr_t)file * 0x9E3779B97F4A7C15ull ^ line;
  for (const uintptr_t* fp = (const uintptr_t*)__builtin_frame_address(0); (uintptr_t)fp - lo < hi - lo;
       fp = (const uintptr_t*)fp[0])
    h = (h ^ fp[1]) * 0x100000001B3ull;
  return h;
}
static void check_no_thread_exited(Worker* w, const char* file, unsigned line) {
  if (w->alive < w->count)
    fail("threadgroup_barrier at %s:%u completed with %d of %d threads already returned: every thread of a "
         "threadgroup must reach each threadgroup_barrier (undefined behaviour on Metal)",
         file, line, w->count - w->alive, w->count);
}
static uint32_t popcount(uint32_t x) { return (uint32_t)__builtin_popcount(x); }
static void new_device_interval(Worker* w) { w->epoch[DEVICE_MEMORY] = ++w->device_intervals * 2 + w->id; }
// The waiting lanes of a simdgroup are released once every live lane waits somewhere (a SIMD-group call,
// a barrier) or has returned: lanes at the same call (same call path) form one set of active lanes, as
// when the GPU runs the branches of divergent code one after the other.
static void release_waiting(SimdGroup& g) {
  SimdExchange& x = g.buf[g.round & 1];
  for (uint32_t pending = g.waiting; pending;) {
    const int first = __builtin_ctz(pending);
    uint32_t set = 0;
    int flags = ~0;
    for (uint32_t m = pending; m; m &= m - 1) {
      const int lane = __builtin_ctz(m);
      if (g.path[lane] == g.path[first]) {
        set |= 1u << lane;
        flags &= g.flags[lane];
      }
    }
    for (uint32_t m = set; m; m &= m - 1) x.participants[__builtin_ctz(m)] = set;
    // A simdgroup_barrier orders memory for the lanes of its simdgroup only when all of them take part.
    if ((set & g.barrier_lanes) && set == g.live) {
      if (flags & MEM_THREADGROUP) g.epoch[THREADGROUP_MEMORY]++;
      if (flags & MEM_DEVICE) g.epoch[DEVICE_MEMORY]++;
    }
    pending &= ~set;
  }
  x.has_result = 0;
  g.running += (int)popcount(g.waiting);
  g.waiting = g.barrier_lanes = 0;
  g.round++;
  g.generation++;
}
// A live lane stopped (waits or returned): release the simdgroup's waiting lanes if it was the last one.
static void lane_stopped(SimdGroup& g) {
  if (--g.running == 0 && g.waiting) release_waiting(g);
}
static void complete_threadgroup_barrier(Worker* w) {
  w->tg_arrived = 0;
  w->tg_generation++;
  if (w->tg_flags & MEM_THREADGROUP) w->epoch[THREADGROUP_MEMORY]++;
  if (w->tg_flags & MEM_DEVICE) new_device_interval(w);
  for (int s = 0; s < w->num_simdgroups; s++) w->simdgroups[s].running = (int)popcount(w->simdgroups[s].live);
}
void threadgroup_barrier(int mem_flags, const char* file, unsigned line) {
  Worker* w = g_worker;
  const uint64_t path = call_path(file, line);
  w->stats.threadgroup_barriers++;
  if (w->tg_arrived == 0) {
    w->tg_path = path;
    w->tg_file = file;
    w->tg_line = line;
    w->tg_flags = mem_flags;
  } else if (path != w->tg_path) {
    fail("divergent threadgroup_barrier: this thread is at %s:%u while other threads wait at %s:%u%s", file, line,
         w->tg_file, w->tg_line, line == w->tg_line && !strcmp(file, w->tg_file)
             ? " (the same barrier reached through different calls: a helper with a barrier called from divergent code)" : "");
  }
  w->tg_flags &= mem_flags;   // memory is ordered only as far as every thread's barrier promises
  unsigned seen = w->tg_generation;
  w->spins = 0;
  if (++w->tg_arrived >= w->alive) {
    check_no_thread_exited(w, file, line);
    complete_threadgroup_barrier(w);
    return;
  }
  lane_stopped(w->simdgroups[current->simdgroup]);
  wait_for(w, &w->tg_generation, seen, "threadgroup_barrier", file, line);
}
static SimdExchange* simd_sync(uint64_t path, int flags, bool is_barrier, const char* what, const char* file,
                               unsigned line) {
  Worker* w = g_worker;
  ThreadContext* c = current;
  SimdGroup& g = w->simdgroups[c->simdgroup];
  SimdExchange* x = &g.buf[g.round & 1];
  g.path[c->lane] = path;
  g.flags[c->lane] = flags;
  g.waiting |= 1u << c->lane;
  if (is_barrier) g.barrier_lanes |= 1u << c->lane;
  unsigned seen = g.generation;
  w->spins = 0;
  lane_stopped(g);
  wait_for(w, &g.generation, seen, what, file, line);
  return x;
}
void simdgroup_barrier(int mem_flags, const char* file, unsigned line) {
  simd_sync(call_path(file, line), mem_flags, true, "simdgroup_barrier", file, line);
}
SimdExchange* simd_exchange(const void* value, size_t bytes, const char* file, unsigned line) {
  Worker* w = g_worker;
  ThreadContext* c = current;
  w->stats.simd_collectives++;
  SimdGroup& g = w->simdgroups[c->simdgroup];
  memcpy(g.buf[g.round & 1].slot[c->lane], value, bytes);
  return simd_sync(call_path(file, line), 0, false, "a SIMD-group function", file, line);
}

// ------------------------------------------------------------------------------------------ bindings
void* bind_buffer(int index, size_t bytes_needed, bool is_reference, BufferUse use) {
  if (index < 0 || index >= MSLSIM_MAX_BUFFERS) fail("[[buffer(%d)]] is out of range 0..30", index);
  const Binding& b = g_bindings[index];
  if (!b.sim) fail("the kernel takes [[buffer(%d)]] but no buffer was bound at index %d", index, index);
  if (is_reference && bytes_needed > b.size)
    fail("[[buffer(%d)]] is bound to %llu bytes but the kernel reads a %zu-byte object from it", index,
         (unsigned long long)b.size, bytes_needed);
  Region& r = g_regions[b.region];   // flags set once per launch (written only when they change)
  if (use == BUFFER_WRITE && !r.writable) r.writable = true;
  volatile bool& bound = use == BUFFER_CONSTANT ? r.bound_constant : r.bound_device;
  if (!bound) bound = true;
  return b.sim;
}
// Place an array in threadgroup slot `slot`: poisoned (0xFF: an unwritten float reads as NaN), shadow
// cleared, counted against the 32 KiB budget.
static unsigned char* place_array(Worker* w, int slot, const void* key, size_t size, size_t align, const char* name) {
  size_t packed = (w->packed_used + align - 1) & ~(align - 1);
  if (packed + size > kArenaSize) {
    char list[512] = "";
    size_t k = 0;
    for (int i = 0; i < kThreadgroupSlots && k < sizeof list; i++)
      if (w->arrays[i].name) k += snprintf(list + k, sizeof list - k, "%s %zu B, ", w->arrays[i].name, w->arrays[i].size);
    fail("threadgroup memory exceeds the %d-byte Metal limit: %s%s %zu B need %zu bytes", MSLSIM_MAX_THREADGROUP_MEMORY,
         list, name, size, packed + size);
  }
  w->packed_used = packed + size;
  unsigned char* base = w->tg_window + slot * kSlot + kSlot / 2;
  w->arrays[slot] = {key, (uintptr_t)base, size, packed, name};
  memset(base, 0xFF, size);
  if (w->check) memset(w->shadow + packed, 0, size * sizeof(ShadowByte));
  return base;
}
void* absent_argument() {
  alignas(64) static const unsigned char zeros[256] = {};
  return (void*)zeros;
}
void* bind_threadgroup_arg(int index) {
  if (index < 0 || index >= MSLSIM_MAX_BUFFERS || !g_worker->arrays[kMaxArrays + index].name)
    fail("the kernel takes [[threadgroup(%d)]] memory but no threadgroup memory length was set at index %d", index,
         index);
  return (void*)g_worker->arrays[kMaxArrays + index].base;
}
void* threadgroup_variable(const void* key, size_t size, size_t align, const char* name) {
  Worker* w = g_worker;
  for (int i = 0; i < w->num_vars; i++)
    if (w->arrays[i].key == key) return (void*)w->arrays[i].base;
  if (w->num_vars == kMaxArrays) fail("more than %d threadgroup variables", kMaxArrays);
  return place_array(w, w->num_vars++, key, size, align < 16 ? 16 : align, name);
}

// ------------------------------------------------------------------------------------------ function constants
void function_constant_not_set(const char* name) {
  fail("function constant '%s' is used but no value was set for it (MTLFunctionConstantValues)", name);
}
static int type_size(int type) {
  switch (type) {
    case MSLSIM_BOOL: case MSLSIM_CHAR: case MSLSIM_UCHAR: return 1;
    case MSLSIM_HALF: case MSLSIM_SHORT: case MSLSIM_USHORT: return 2;
    case MSLSIM_INT: case MSLSIM_UINT: case MSLSIM_FLOAT: return 4;
  }
  return 0;
}
static int set_function_constants(const MslsimLaunch* L, char* err, size_t n) {
  for (int i = 0; i < g_num_constants; i++) *g_constants[i].defined = false;
  for (int k = 0; k < L->num_constants; k++) {
    const MslsimConstant& c = L->constants[k];
    bool found = false;
    for (int i = 0; i < g_num_constants; i++) {
      ConstantEntry& e = g_constants[i];
      if (e.index != c.index) continue;
      if (e.type != c.type) {
        snprintf(err, n, "function constant %d ('%s') is declared with type code %d but was given type code %d",
                 c.index, e.name, e.type, c.type);
        return -1;
      }
      memcpy(e.value, c.value, type_size(e.type));
      *e.defined = true;
      found = true;
    }
    if (!found) {
      snprintf(err, n, "function constant index %d is not declared by any kernel of this library", c.index);
      return -1;
    }
  }
  return 0;
}

// ------------------------------------------------------------------------------------------ memory checks
static const char* access_verb(bool store) { return store ? "writes" : "reads"; }
[[noreturn]] static void device_out_of_bounds(const Region& r, uintptr_t a, size_t n, bool store) {
  if (a < r.lo)
    fail("out-of-bounds device access: %s %zu bytes at byte offset -%llu of [[buffer(%d)]] (before its start)",
         access_verb(store), n, (unsigned long long)(r.lo - a), r.first_index);
  fail("out-of-bounds device access: %s %zu bytes at byte offset %llu of [[buffer(%d)]], which is %llu bytes long",
       access_verb(store), n, (unsigned long long)(a - r.lo), r.first_index, (unsigned long long)(r.hi - r.lo));
}
[[noreturn]] static void threadgroup_out_of_bounds(const ThreadgroupArray& t, uintptr_t a, size_t n, bool store) {
  if (!t.name)
    fail("out-of-bounds threadgroup access: %s %zu bytes that belong to no threadgroup array", access_verb(store), n);
  fail("out-of-bounds threadgroup access: %s %zu bytes at byte offset %lld of threadgroup array '%s', which is %zu "
       "bytes long", access_verb(store), n, (long long)(a - t.base), t.name, t.size);
}
// Is an earlier access, made by a thread of `simdgroup` in interval `epoch` and simdgroup interval
// `simd_epoch`, ordered before the current thread's access? Only barriers whose mem_flags cover the memory
// kind order threads: a threadgroup_barrier orders everyone, a simdgroup_barrier the lanes of one simdgroup.
static inline bool happened_before(const Worker* w, const ThreadContext* c, int kind, unsigned simdgroup,
                                   uint32_t epoch, uint32_t simd_epoch) {
  if (epoch != w->epoch[kind]) return true;
  return simdgroup == c->simdgroup && simd_epoch != w->simdgroups[c->simdgroup].epoch[kind];
}
// Race (and, for threadgroup memory, uninitialised-read) check of bytes [off, off + n) of one array or
// buffer whose shadow is `shadow`; name(buffer) writes its name for messages (only when one fails).
template <class Name>
static void check_order(Worker* w, ShadowByte* shadow, int kind, size_t off, size_t n, bool store, Name name) {
  const ThreadContext* c = current;
  char what[96];
  const uint16_t me = (uint16_t)c->thread_index_in_threadgroup;
  const uint32_t epoch = w->epoch[kind], simd_epoch = w->simdgroups[c->simdgroup].epoch[kind];
  const char* space = kind == THREADGROUP_MEMORY ? "threadgroup" : "device";
  const char* fix = kind == THREADGROUP_MEMORY ? "mem_threadgroup" : "mem_device";
  for (size_t i = 0; i < n; i++) {
    ShadowByte& s = shadow[off + i];
    const bool other_writer = s.initialized && s.writer != me &&
                              !happened_before(w, c, kind, s.writer / MSLSIM_SIMD_WIDTH, s.write_epoch, s.write_simd_epoch);
    if (store) {
      if (other_writer) {
        name(what, sizeof what);
        fail("%s memory race: threads %u and %u write byte %zu of %s with no barrier (%s) in between", space, s.writer,
             me, off + i, what, fix);
      }
      if (s.read_epoch == epoch && s.reader != me &&
          !happened_before(w, c, kind, s.reader_simdgroup, s.read_epoch, s.read_simd_epoch)) {
        name(what, sizeof what);
        fail("%s memory race: thread %u writes byte %zu of %s that %s read with no barrier (%s) in between", space, me,
             off + i, what, s.reader == kManyReaders ? "other threads" : "another thread", fix);
      }
      s.initialized = 1;
      s.writer = me;
      s.write_epoch = epoch;
      s.write_simd_epoch = simd_epoch;
    } else {
      if (!s.initialized && kind == THREADGROUP_MEMORY) {
        name(what, sizeof what);
        fail("read of uninitialised threadgroup memory: byte %zu of %s was never written by this threadgroup", off + i,
             what);
      }
      if (other_writer) {
        name(what, sizeof what);
        fail("%s memory race: thread %u reads byte %zu of %s written by thread %u with no barrier (%s) in between",
             space, me, off + i, what, s.writer, fix);
      }
      if (s.read_epoch != epoch) {
        s.read_epoch = epoch;
        s.reader = me;
        s.reader_simdgroup = (uint16_t)c->simdgroup;
      } else if (s.reader != me) {
        s.reader = kManyReaders;
        if (s.reader_simdgroup != c->simdgroup) s.reader_simdgroup = kManyReaders;
      }
      s.read_simd_epoch = simd_epoch;
    }
  }
}
// Profile accounting of one access: a memory instruction of its width, or part of a matrix load/store.
enum Space { DEVICE_SPACE, THREADGROUP_SPACE, CONSTANT_SPACE };
static void profile_access(Worker* w, Space space, size_t n, bool store) {
  const bool threadgroup = space == THREADGROUP_SPACE;
  uint64_t* p = w->stats.profile;
  if (w->matrix_kind) {
    if (!w->matrix_counted)
      p[w->matrix_kind == 1 ? (threadgroup ? MSLSIM_PROFILE_matrix_load_threadgroup : MSLSIM_PROFILE_matrix_load_device)
                            : (threadgroup ? MSLSIM_PROFILE_matrix_store_threadgroup : MSLSIM_PROFILE_matrix_store_device)]++;
    w->matrix_counted = true;
    return;
  }
  const int base = space == CONSTANT_SPACE ? MSLSIM_PROFILE_constant_load_1   // (stores there fail before)
                   : threadgroup ? (store ? MSLSIM_PROFILE_threadgroup_store_1 : MSLSIM_PROFILE_threadgroup_load_1)
                                 : (store ? MSLSIM_PROFILE_device_store_1 : MSLSIM_PROFILE_device_load_1);
  const int width = n == 1 ? 0 : n == 2 ? 1 : n == 4 ? 2 : n == 8 ? 3 : n == 16 ? 4 : 5;   // 1 2 4 8 16 other
  p[base + width]++;
  p[base + 6] += n;   // <space>_bytes
}
void profile_matrix_access(int kind) {
  g_worker->matrix_kind = kind;
  g_worker->matrix_counted = false;
}
void profile_count(int counter) { g_worker->stats.profile[counter]++; }
// (not inlined into on_access: its fast path, an access to thread-private memory, then needs no stack frame)
__attribute__((noinline)) static void threadgroup_access(Worker* w, uintptr_t a, size_t n, bool store) {
  const ThreadgroupArray& t = w->arrays[(a - (uintptr_t)w->tg_window) >> kSlotBits];
  if (!t.name || a < t.base || a + n > t.base + t.size) threadgroup_out_of_bounds(t, a, n, store);
  if (store) w->stats.threadgroup_bytes_written += n;
  else w->stats.threadgroup_bytes_read += n;
  if (w->profiling) profile_access(w, THREADGROUP_SPACE, n, store);
  if (!w->check) return;
  check_order(w, w->shadow + t.packed, THREADGROUP_MEMORY, a - t.base, n, store,
              [&](char* out, size_t len) { snprintf(out, len, "threadgroup array '%s'", t.name); });
}
__attribute__((noinline)) static void device_access(Worker* w, uintptr_t a, size_t n, bool store) {
  const Region& r = g_regions[(a - g_window_lo) >> kSlotBits];
  if (a < r.lo || a + n > r.hi) device_out_of_bounds(r, a, n, store);
  const bool constant = constant_space(r);
  if (constant && store)
    fail("write of %zu bytes to [[buffer(%d)]], a `constant` kernel argument: the constant address space is read-only",
         n, r.first_index);
  (store ? w->stats.device_bytes_written : w->stats.device_bytes_read)[r.first_index] += n;
  if (w->profiling) profile_access(w, constant ? CONSTANT_SPACE : DEVICE_SPACE, n, store);
  if (!w->check || !r.writable) return;
  check_order(w, r.shadow, DEVICE_MEMORY, a - r.lo, n, store,
              [&](char* out, size_t len) { snprintf(out, len, "[[buffer(%d)]]", r.first_index); });
}
static inline void on_access(uintptr_t a, size_t n, bool store) {
  Worker* w = g_worker;
  if (__builtin_expect(!w || !w->in_kernel, 0)) return;
  if (a - (uintptr_t)w->tg_window < kThreadgroupSlots * kSlot) return threadgroup_access(w, a, n, store);
  if (a - g_window_lo < g_window_span) return device_access(w, a, n, store);
  // anything else is thread-private memory (stack, spilled registers) or the simulator's own state
}
// Atomics are compiled without tracing (see shim.h); they report here: bounds-checked, and treated by the
// race checker as initialising and ordered with everything.
void note_atomic(const void* p, size_t n) {
  Worker* w = g_worker;
  uintptr_t a = (uintptr_t)p;
  if (a - (uintptr_t)w->tg_window < kThreadgroupSlots * kSlot) {
    const ThreadgroupArray& t = w->arrays[(a - (uintptr_t)w->tg_window) >> kSlotBits];
    if (!t.name || a < t.base || a + n > t.base + t.size) threadgroup_out_of_bounds(t, a, n, true);
    if (!w->check) return;
    for (size_t i = 0; i < n; i++) {
      ShadowByte& s = w->shadow[t.packed + (a - t.base) + i];
      s = ShadowByte{};
      s.initialized = 1;
      s.writer = (uint16_t)current->thread_index_in_threadgroup;
      s.write_epoch = w->epoch[THREADGROUP_MEMORY] - 1;   // an earlier interval: ordered with everything
    }
  } else if (a - g_window_lo < g_window_span) {
    const Region& r = g_regions[(a - g_window_lo) >> kSlotBits];
    if (a < r.lo || a + n > r.hi) device_out_of_bounds(r, a, n, true);
  }
}
uint64_t launch_serial() { return g_launch_serial; }

void work_count(int counter, uint64_t amount) {
  if (counter < 0) fail("more than %d distinct work counters", MSLSIM_MAX_COUNTERS);
  g_worker->stats.counters[counter] += amount;
}

}  // namespace rt
}  // namespace mslsim

// Called by every load/store of kernel code (clang -fsanitize-coverage=trace-loads,trace-stores).
#define MSLSIM_TRACE(n)                                                                                    \
  extern "C" __attribute__((visibility("hidden"))) void __sanitizer_cov_load##n(void* p) {               \
    mslsim::rt::on_access((uintptr_t)p, n, false);                                                        \
  }                                                                                                        \
  extern "C" __attribute__((visibility("hidden"))) void __sanitizer_cov_store##n(void* p) {              \
    mslsim::rt::on_access((uintptr_t)p, n, true);                                                         \
  }
MSLSIM_TRACE(1)
MSLSIM_TRACE(2)
MSLSIM_TRACE(4)
MSLSIM_TRACE(8)
MSLSIM_TRACE(16)

// Aggregate copies and fills (a struct copied whole, an array zeroed) are memory intrinsics, which the
// tracing above does not see; build.py reroutes them here.
extern "C" __attribute__((visibility("hidden"))) void mslsim_memcpy(void* dst, const void* src, size_t n, bool) {
  if (n) {
    mslsim::rt::on_access((uintptr_t)src, n, false);
    mslsim::rt::on_access((uintptr_t)dst, n, true);
  }
  memmove(dst, src, n);
}
// Called at the top of every basic block of a GPU twin that holds kernel arithmetic (build.py): adds the
// block's instruction mix, one count per MSLSIM_ARITHMETIC_CLASSES entry.
extern "C" __attribute__((visibility("hidden"))) void mslsim_profile_block(const uint32_t* mix) {
  uint64_t* p = mslsim::rt::g_worker->stats.profile + MSLSIM_PROFILE_fp32;
  for (int k = 0; k < MSLSIM_NUM_ARITHMETIC_CLASSES; k++) p[k] += mix[k];
}
extern "C" __attribute__((visibility("hidden"))) void mslsim_memset(void* dst, uint8_t value, size_t n, bool) {
  if (n) mslsim::rt::on_access((uintptr_t)dst, n, true);
  memset(dst, value, n);
}

namespace mslsim {
namespace rt {

// ------------------------------------------------------------------------------------------ fault handling
static struct sigaction g_old_segv, g_old_bus;
static void on_fault(int sig, siginfo_t* info, void* uctx) {
  Worker* w = g_worker;
  if (w && w->in_kernel) {
    uintptr_t a = (uintptr_t)info->si_addr;
    char where[256];
    describe_thread(where, sizeof where);
    // below the current fiber's stack (past its guard page): a frame larger than the stack
    const uintptr_t stack_lo = (uintptr_t)w->stacks + (kStackSize + kPage) * w->current + kPage;
    if (w->stacks && a < stack_lo && stack_lo - a < (64u << 20))
      snprintf(w->message, sizeof w->message,
               "%s: stack overflow (each GPU thread has %zu KiB of stack in the simulator; recursion or a huge "
               "thread-local array?)", where, kStackSize / 1024);
    else
      snprintf(w->message, sizeof w->message,
               "%s: invalid memory access at address %p (%s), outside every bound buffer and threadgroup memory", where,
               info->si_addr, sig == SIGBUS ? "bus error" : "segmentation fault");
    w->failed = true;
    g_abort = 1;
    siglongjmp(w->escape, 1);
  }
  struct sigaction* old = sig == SIGBUS ? &g_old_bus : &g_old_segv;   // not ours: let the previous owner act
  if (old->sa_flags & SA_SIGINFO) old->sa_sigaction(sig, info, uctx);
  else if (old->sa_handler != SIG_IGN && old->sa_handler != SIG_DFL) old->sa_handler(sig);
  else { sigaction(sig, old, nullptr); raise(sig); }
}
static void install_fault_handler() {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &g_old_segv);
  sigaction(SIGBUS, &sa, &g_old_bus);
}
static void remove_fault_handler() {
  sigaction(SIGSEGV, &g_old_segv, nullptr);
  sigaction(SIGBUS, &g_old_bus, nullptr);
}

// ------------------------------------------------------------------------------------------ threadgroups
static void fiber_main(Fiber* f);
static int worker_setup(Worker* w, int threads, char* err, size_t n) {
  if (threads > w->capacity) {
    if (w->stacks) munmap(w->stacks, w->stacks_len);
    free(w->fibers);
    free(w->order);
    free(w->position);
    w->fibers = (Fiber*)calloc(threads, sizeof(Fiber));
    w->order = (int*)malloc(threads * sizeof(int));
    w->position = (int*)malloc(threads * sizeof(int));
    w->capacity = threads;
    size_t per = kStackSize + kPage;   // a guard page below each fiber stack turns overflow into a fault
    w->stacks_len = per * threads;
    w->stacks = (char*)mmap(nullptr, w->stacks_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                            -1, 0);
    if (w->stacks == MAP_FAILED) {
      w->stacks = nullptr;
      w->capacity = 0;
      snprintf(err, n, "cannot map %zu bytes of fiber stacks", w->stacks_len);
      return -1;
    }
    for (int i = 0; i < threads; i++) mprotect(w->stacks + per * i, kPage, PROT_NONE);
  }
  w->count = threads;
  int nsg = (threads + MSLSIM_SIMD_WIDTH - 1) / MSLSIM_SIMD_WIDTH;
  if (nsg > w->simdgroup_capacity) {
    free(w->simdgroups);
    w->simdgroups = (SimdGroup*)aligned_alloc(64, sizeof(SimdGroup) * nsg);
    w->simdgroup_capacity = nsg;
  }
  w->num_simdgroups = nsg;
  if (!w->tg_window) {   // reserved once per worker; the centre of each slot is usable memory
    void* window = mmap(nullptr, kThreadgroupSlots * kSlot, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (window == MAP_FAILED) {
      snprintf(err, n, "cannot reserve address space for threadgroup memory");
      return -1;
    }
    w->tg_window = (unsigned char*)window;
    for (int i = 0; i < kThreadgroupSlots; i++)
      mprotect(w->tg_window + i * kSlot + kSlot / 2, kArenaSize, PROT_READ | PROT_WRITE);
    w->shadow = (ShadowByte*)calloc(kArenaSize, sizeof(ShadowByte));
  }
  return 0;
}

static void run_threadgroup(Worker* w, uint3_ tg) {
  const MslsimLaunch& L = *g_launch;
  const int n = w->count, W = MSLSIM_SIMD_WIDTH;
  w->alive = n;
  w->tg_arrived = 0;
  w->epoch[THREADGROUP_MEMORY] = 1;
  new_device_interval(w);   // accesses of earlier threadgroups count as ordered (races between threadgroups are not modelled)
  w->spins = 0;
  for (int s = 0; s < w->num_simdgroups; s++) {
    SimdGroup& g = w->simdgroups[s];
    const int lanes = (s + 1) * W <= n ? W : n - s * W;
    g.live = lanes == 32 ? ~0u : (1u << lanes) - 1;
    g.running = lanes;
    g.waiting = g.barrier_lanes = 0;
    g.generation = g.round = 0;
    g.epoch[0] = g.epoch[1] = 0;
  }
  w->num_vars = 0;
  w->packed_used = 0;
  for (int i = 0; i < kThreadgroupSlots; i++) w->arrays[i].name = nullptr;
  static const char* const arg_names[MSLSIM_MAX_BUFFERS] = {
      "[[threadgroup(0)]]", "[[threadgroup(1)]]", "[[threadgroup(2)]]", "[[threadgroup(3)]]", "[[threadgroup(4)]]",
      "[[threadgroup(5)]]", "[[threadgroup(6)]]", "[[threadgroup(7)]]", "[[threadgroup(8)]]", "[[threadgroup(9)]]",
      "[[threadgroup(10)]]", "[[threadgroup(11)]]", "[[threadgroup(12)]]", "[[threadgroup(13)]]", "[[threadgroup(14)]]",
      "[[threadgroup(15)]]", "[[threadgroup(16)]]", "[[threadgroup(17)]]", "[[threadgroup(18)]]", "[[threadgroup(19)]]",
      "[[threadgroup(20)]]", "[[threadgroup(21)]]", "[[threadgroup(22)]]", "[[threadgroup(23)]]", "[[threadgroup(24)]]",
      "[[threadgroup(25)]]", "[[threadgroup(26)]]", "[[threadgroup(27)]]", "[[threadgroup(28)]]", "[[threadgroup(29)]]",
      "[[threadgroup(30)]]"};
  for (int i = 0; i < MSLSIM_MAX_BUFFERS; i++)   // sizes were checked against the limit at launch
    if (L.threadgroup_memory[i]) place_array(w, kMaxArrays + i, nullptr, L.threadgroup_memory[i], 16, arg_names[i]);
  for (int i = 0; i < n; i++) w->order[i] = L.schedule == MSLSIM_REVERSE ? n - 1 - i : i;
  if (L.schedule == MSLSIM_RANDOM)
    for (int i = n - 1; i > 0; i--) {   // Fisher-Yates with xorshift64
      w->rng ^= w->rng << 13;
      w->rng ^= w->rng >> 7;
      w->rng ^= w->rng << 17;
      int k = (int)(w->rng % (uint64_t)(i + 1)), t = w->order[i];
      w->order[i] = w->order[k];
      w->order[k] = t;
    }
  for (int i = 0; i < n; i++) w->position[w->order[i]] = i;
  const size_t per = kStackSize + kPage;
  for (int i = 0; i < n; i++) {
    Fiber& f = w->fibers[i];
    f.done = false;
    ThreadContext& c = f.ctx;
    c.threads_per_threadgroup = {L.threads[0], L.threads[1], L.threads[2]};
    c.threadgroups_per_grid = {L.threadgroups[0], L.threadgroups[1], L.threadgroups[2]};
    c.threadgroup_position_in_grid = tg;
    c.thread_index_in_threadgroup = i;
    c.thread_position_in_threadgroup = {i % L.threads[0], (i / L.threads[0]) % L.threads[1],
                                        i / (L.threads[0] * L.threads[1])};
    c.thread_position_in_grid = {tg.x * L.threads[0] + c.thread_position_in_threadgroup.x,
                                 tg.y * L.threads[1] + c.thread_position_in_threadgroup.y,
                                 tg.z * L.threads[2] + c.thread_position_in_threadgroup.z};
    c.lane = i % W;
    c.simdgroup = i / W;
    c.simdgroups_per_threadgroup = w->num_simdgroups;
    // initial frame consumed by mslsim_switch: control words, r15..rbp, return into the trampoline
    uint64_t* sp = (uint64_t*)(((uintptr_t)(w->stacks + per * (i + 1)) & ~(uintptr_t)15) - 64);
    uint32_t mxcsr = 0x1F80;   // round-to-nearest-even, no flush-to-zero: IEEE like the GPU's fp32 path
    uint16_t fpucw = 0x037F;
    memcpy(&sp[0], &mxcsr, 4);
    memcpy((char*)&sp[0] + 4, &fpucw, 2);
    sp[1] = 0;
    sp[2] = 0;
    sp[3] = (uint64_t)(uintptr_t)&f;
    sp[4] = (uint64_t)(uintptr_t)&fiber_main;
    sp[5] = 0;
    sp[6] = 0;
    sp[7] = (uint64_t)(uintptr_t)&mslsim_trampoline;
    f.sp = sp;
  }
  int first = w->order[0];
  w->current = first;
  current = &w->fibers[first].ctx;
  w->stats.fiber_switches++;
  w->in_kernel = true;
  if (sigsetjmp(w->escape, 0) == 0) mslsim_switch(&w->main_sp, w->fibers[first].sp);
  w->in_kernel = false;
  uint32_t used = (uint32_t)w->packed_used;
  if (used > w->stats.threadgroup_memory_peak) w->stats.threadgroup_memory_peak = used;
  w->stats.threadgroups++;
}

static KernelEntry* g_entry;
static bool g_profiling;   // this launch profiles (it runs the GPU twins)
static void fiber_main(Fiber* f) {
  Worker* w = g_worker;
  g_entry->entry();
  // A returning thread leaves its simdgroup's lane set and the barrier's participant count.
  f->done = true;
  w->alive--;
  SimdGroup& g = w->simdgroups[f->ctx.simdgroup];
  g.live &= ~(1u << f->ctx.lane);
  lane_stopped(g);
  if (w->tg_arrived > 0 && w->tg_arrived >= w->alive) {
    check_no_thread_exited(w, w->tg_file, w->tg_line);
  }
  w->spins = 0;
  if (w->alive == 0) mslsim_switch(&f->sp, w->main_sp);
  switch_to(w, next_alive(w));
  __builtin_trap();   // a finished fiber is never resumed
}

struct WorkerJob { Worker* w; int stride; };
static void* worker_main(void* p) {
  WorkerJob* job = (WorkerJob*)p;
  Worker* w = job->w;
  g_worker = w;
  stack_t alt, old_alt;   // the fault handler must not run on a fiber stack that just overflowed
  alt.ss_sp = malloc(64 * 1024);
  alt.ss_size = 64 * 1024;
  alt.ss_flags = 0;
  sigaltstack(&alt, &old_alt);
  const MslsimLaunch& L = *g_launch;
  for (uint64_t k = w->id; k < g_num_selected && !g_abort; k += job->stride) {
    const uint64_t t = g_selected ? g_selected[k] : k;
    uint3_ tg = {(uint32_t)(t % L.threadgroups[0]), (uint32_t)((t / L.threadgroups[0]) % L.threadgroups[1]),
                 (uint32_t)(t / ((uint64_t)L.threadgroups[0] * L.threadgroups[1]))};
    run_threadgroup(w, tg);
  }
  sigaltstack(&old_alt, nullptr);
  free(alt.ss_sp);
  g_worker = nullptr;
  current = nullptr;
  return nullptr;
}

// ------------------------------------------------------------------------------------------ device window
static int map_window(const MslsimLaunch* L, char* err, size_t n) {
  // Group bindings whose host ranges overlap (aliasing views of one allocation share one copy).
  int idx[MSLSIM_MAX_BUFFERS], m = 0;
  for (int i = 0; i < MSLSIM_MAX_BUFFERS; i++) {
    g_bindings[i] = {};
    if (L->buffers[i].data) idx[m++] = i;
  }
  for (int i = 1; i < m; i++)
    for (int j = i; j > 0 && L->buffers[idx[j]].data < L->buffers[idx[j - 1]].data; j--) {
      int t = idx[j]; idx[j] = idx[j - 1]; idx[j - 1] = t;
    }
  struct Group { uintptr_t lo, hi; int first; } groups[MSLSIM_MAX_BUFFERS];
  int ng = 0;
  for (int k = 0; k < m; k++) {
    const MslsimBuffer& b = L->buffers[idx[k]];
    uintptr_t lo = (uintptr_t)b.data, hi = lo + b.size;
    if (ng && lo < groups[ng - 1].hi) {
      if (hi > groups[ng - 1].hi) groups[ng - 1].hi = hi;
      if (idx[k] < groups[ng - 1].first) groups[ng - 1].first = idx[k];
    } else {
      groups[ng++] = {lo, hi, idx[k]};
    }
  }
  g_num_regions = 0;
  if (ng == 0) return 0;
  g_window = (unsigned char*)mmap(nullptr, ng * kSlot, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (g_window == MAP_FAILED) {
    g_window = nullptr;
    snprintf(err, n, "cannot reserve address space for simulated device memory");
    return -1;
  }
  g_window_lo = (uintptr_t)g_window;
  g_window_span = ng * kSlot;
  for (int g = 0; g < ng; g++) {
    size_t bytes = groups[g].hi - groups[g].lo, pages = (bytes + kPage - 1) & ~(kPage - 1);
    unsigned char* sim = g_window + g * kSlot + kSlot / 2;
    if (pages && mprotect(sim, pages, PROT_READ | PROT_WRITE)) {
      snprintf(err, n, "cannot map %zu bytes of simulated device memory", pages);
      return -1;
    }
    memcpy(sim, (void*)groups[g].lo, bytes);
    // The race checker's shadow is reserved for every buffer but touched only for those the kernel may write.
    size_t shadow_len = ((bytes * sizeof(ShadowByte)) + kPage - 1) & ~(kPage - 1);
    void* shadow = shadow_len ? mmap(nullptr, shadow_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0) : nullptr;
    if (shadow == MAP_FAILED) {
      snprintf(err, n, "cannot map the race checker's shadow of %zu bytes of device memory", bytes);
      return -1;
    }
    g_regions[g] = {(uintptr_t)sim, (uintptr_t)sim + bytes, (unsigned char*)groups[g].lo, groups[g].first,
                    (ShadowByte*)shadow, shadow_len, false, false, false};
    g_num_regions = g + 1;
    for (int k = 0; k < m; k++) {
      uintptr_t lo = (uintptr_t)L->buffers[idx[k]].data;
      if (lo >= groups[g].lo && lo < groups[g].hi + (groups[g].hi == groups[g].lo))
        g_bindings[idx[k]] = {sim + (lo - groups[g].lo), L->buffers[idx[k]].size, g};
    }
  }
  return 0;
}
static void unmap_window(bool copy_back) {
  for (int g = 0; g < g_num_regions; g++) {
    if (copy_back) memcpy(g_regions[g].host, (void*)g_regions[g].lo, g_regions[g].hi - g_regions[g].lo);
    if (g_regions[g].shadow) munmap(g_regions[g].shadow, g_regions[g].shadow_len);
  }
  if (g_window) munmap(g_window, g_window_span);
  g_window = nullptr;
  g_window_lo = g_window_span = 0;
  g_num_regions = 0;
}

static Worker g_workers[2];

static std::vector<uint64_t> g_env_selection;

static int select_threadgroups(const MslsimLaunch* L, uint64_t total, char* err, size_t n) {
  g_selected = L->threadgroup_subset;
  g_num_selected = L->num_threadgroup_subset;
  const char* env = getenv("MSLSIM_THREADGROUPS");
  if (!g_selected && env && *env) {
    g_env_selection.clear();
    for (const char* p = env; *p;) {
      char* end;
      g_env_selection.push_back(strtoull(p, &end, 10));
      if (end == p || (*end && *end != ',')) {
        snprintf(err, n, "MSLSIM_THREADGROUPS='%s': expected comma-separated threadgroup ids", env);
        return -1;
      }
      p = *end ? end + 1 : end;
    }
    g_selected = g_env_selection.data();
    g_num_selected = g_env_selection.size();
  }
  if (!g_selected) g_num_selected = total;
  for (uint64_t k = 0; g_selected && k < g_num_selected; k++)
    if (g_selected[k] >= total) {
      snprintf(err, n, "kernel '%s': threadgroup id %llu selected; the grid (%ux%ux%u) has %llu", L->kernel,
               (unsigned long long)g_selected[k], L->threadgroups[0], L->threadgroups[1], L->threadgroups[2],
               (unsigned long long)total);
      return -1;
    }
  return 0;
}

// A launch switch, also set for every launch by an environment variable (not "0").
static int env_flag(int32_t value, const char* name) {
  const char* env = getenv(name);
  return value || (env && *env && strcmp(env, "0"));
}

static int validate(const MslsimLaunch* L, char* err, size_t n) {
  g_entry = nullptr;
  g_profiling = env_flag(L->profile, "MSLSIM_PROFILE");
  const int numerics = g_profiling || env_flag(L->gpu_numerics, "MSLSIM_GPU_NUMERICS");
  for (int i = 0; i < g_num_kernels[numerics]; i++)
    if (!strcmp(g_kernels[numerics][i].name, L->kernel)) g_entry = &g_kernels[numerics][i];
  if (!g_entry) {
    int k = snprintf(err, n, "kernel '%s' not found in this library; it has:", L->kernel);
    for (int i = 0; i < g_num_kernels[numerics] && k < (int)n; i++)
      k += snprintf(err + k, n - k, " %s", g_kernels[numerics][i].name);
    return -1;
  }
  uint64_t threads = (uint64_t)L->threads[0] * L->threads[1] * L->threads[2];
  if (threads == 0 || threads > MSLSIM_MAX_THREADS) {
    snprintf(err, n, "kernel '%s': %llu threads per threadgroup (%ux%ux%u); Metal allows 1 to %d", L->kernel,
             (unsigned long long)threads, L->threads[0], L->threads[1], L->threads[2], MSLSIM_MAX_THREADS);
    return -1;
  }
  uint64_t dynamic = 0;
  for (int i = 0; i < MSLSIM_MAX_BUFFERS; i++) dynamic += (L->threadgroup_memory[i] + 15) & ~15u;
  if (dynamic > MSLSIM_MAX_THREADGROUP_MEMORY) {
    snprintf(err, n, "kernel '%s': %llu bytes of threadgroup memory requested; the Metal limit is %d", L->kernel,
             (unsigned long long)dynamic, MSLSIM_MAX_THREADGROUP_MEMORY);
    return -1;
  }
  return 0;
}

}  // namespace rt
}  // namespace mslsim

using namespace mslsim::rt;

int mslsim_dispatch(const MslsimLaunch* L, MslsimStats* stats, char* err, size_t n) {
  pthread_mutex_lock(&g_dispatch_lock);
  err[0] = 0;
  memset(stats, 0, sizeof *stats);
  g_launch = L;
  g_launch_serial++;
  int rc = validate(L, err, n);
  if (!rc) rc = set_function_constants(L, err, n);
  uint64_t total = (uint64_t)L->threadgroups[0] * L->threadgroups[1] * L->threadgroups[2];
  if (!rc) rc = select_threadgroups(L, total, err, n);
  total = g_num_selected;
  if (!rc && total > 0) rc = map_window(L, err, n);
  if (!rc && total > 0) {
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    int workers = L->workers > 0 ? L->workers : (int)(cores < 2 ? 1 : 2);
    if (workers > 2) workers = 2;
    if ((uint64_t)workers > total) workers = (int)total;
    int threads = (int)(L->threads[0] * L->threads[1] * L->threads[2]);
    g_abort = 0;
    WorkerJob jobs[2];
    for (int i = 0; i < workers && !rc; i++) {
      Worker* w = &g_workers[i];
      w->id = i;
      w->failed = false;
      w->check = L->check_threadgroup != 0;
      w->profiling = g_profiling;
      w->matrix_kind = 0;
      w->stats = MslsimStats{};
      w->rng = 0x9E3779B97F4A7C15ull * (L->seed + 1 + i);
      rc = worker_setup(w, threads, err, n);
      jobs[i] = {w, workers};
    }
    if (!rc) {
      install_fault_handler();
      if (workers == 1) {
        worker_main(&jobs[0]);
      } else {
        pthread_t th[2];
        for (int i = 0; i < workers; i++) pthread_create(&th[i], nullptr, worker_main, &jobs[i]);
        for (int i = 0; i < workers; i++) pthread_join(th[i], nullptr);
      }
      remove_fault_handler();
      for (int i = 0; i < workers; i++) {
        const MslsimStats& s = g_workers[i].stats;
        stats->threadgroups += s.threadgroups;
        stats->fiber_switches += s.fiber_switches;
        stats->threadgroup_barriers += s.threadgroup_barriers;
        stats->simd_collectives += s.simd_collectives;
        stats->threadgroup_bytes_read += s.threadgroup_bytes_read;
        stats->threadgroup_bytes_written += s.threadgroup_bytes_written;
        for (int b = 0; b < MSLSIM_MAX_BUFFERS; b++) {
          stats->device_bytes_read[b] += s.device_bytes_read[b];
          stats->device_bytes_written[b] += s.device_bytes_written[b];
        }
        for (int c = 0; c < MSLSIM_MAX_COUNTERS; c++) stats->counters[c] += s.counters[c];
        // A GPU-numerics launch that does not profile runs the same counting twin: its counts are not reported.
        for (int c = 0; c < MSLSIM_NUM_PROFILE_COUNTERS && g_profiling; c++) stats->profile[c] += s.profile[c];
        if (s.threadgroup_memory_peak > stats->threadgroup_memory_peak)
          stats->threadgroup_memory_peak = s.threadgroup_memory_peak;
        if (g_workers[i].failed && !rc) {
          snprintf(err, n, "%s", g_workers[i].message);
          rc = -1;
        }
      }
    }
    unmap_window(rc == 0);
  }
  stats->num_counters = g_num_counters;
  stats->profiled = g_profiling;
  stats->threads_per_threadgroup = L->threads[0] * L->threads[1] * L->threads[2];
  g_launch = nullptr;
  pthread_mutex_unlock(&g_dispatch_lock);
  return rc;
}

int mslsim_num_kernels(void) { return g_num_kernels[0]; }
const char* mslsim_kernel_name(int i) { return i >= 0 && i < g_num_kernels[0] ? g_kernels[0][i].name : nullptr; }
int mslsim_num_function_constants(void) { return g_num_constants; }
int mslsim_function_constant(int i, int32_t* index, int32_t* type, const char** name) {
  if (i < 0 || i >= g_num_constants) return -1;
  *index = g_constants[i].index;
  *type = g_constants[i].type;
  *name = g_constants[i].name;
  return 0;
}
#define MSLSIM_NAME_(name) #name,
static const char* const g_profile_counter_names[] = {MSLSIM_PROFILE_COUNTERS(MSLSIM_NAME_)};
const char* mslsim_profile_counter_name(int i) {
  return i >= 0 && i < MSLSIM_NUM_PROFILE_COUNTERS ? g_profile_counter_names[i] : nullptr;
}
const char* mslsim_counter_name(int i) { return i >= 0 && i < g_num_counters ? g_counter_names[i] : nullptr; }

// clang lowers __bf16 conversions to these; gcc 12's libgcc lacks them. Round to nearest even, quiet NaNs.
extern "C" __attribute__((visibility("hidden"), weak)) __bf16 __truncsfbf2(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  uint16_t h = (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((u >> 16) | 0x40) : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  __bf16 r;
  memcpy(&r, &h, 2);
  return r;
}
