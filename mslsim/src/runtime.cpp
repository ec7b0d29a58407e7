// mslsim runtime: executes shimmed MSL compute kernels on the CPU.
//
// Execution model. A launch runs its threadgroups on up to `workers` OS threads. Inside a threadgroup
// every GPU thread is a cooperative fiber; fibers switch only at threadgroup_barrier, simdgroup_barrier
// and SIMD-group collectives, so code between two synchronisation points runs uninterrupted, like a
// warp between two barriers.
//
// Memory model. Device buffers are copied into one guarded "device window" for the launch (each buffer
// page-aligned, surrounded by inaccessible gaps) and copied back afterwards. Kernel code is compiled
// with clang's load/store tracing (-fsanitize-coverage=trace-loads,trace-stores), so every memory access
// the kernel makes passes through on_access(): accesses inside the window but outside a buffer are
// out-of-bounds errors (exact to the byte), and bytes read/written are counted per buffer. Threadgroup
// memory lives in a per-worker arena with a shadow that can flag uninitialised reads and unordered
// accesses by different threads (races).
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
static KernelEntry g_kernels[256];
static int g_num_kernels;
static ConstantEntry g_constants[256];
static int g_num_constants;
static const char* g_counter_names[MSLSIM_MAX_COUNTERS];
static int g_num_counters;

int register_kernel(const char* name, void (*entry)()) {
  if (g_num_kernels < 256) g_kernels[g_num_kernels++] = {name, entry};
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
struct Region {              // one group of (possibly aliasing) bound buffers inside the device window
  uintptr_t lo, hi;          // accessible bytes [lo, hi)
  unsigned char* host;       // where they came from
  int first_index;           // buffer index the bytes are counted against
};
struct Binding { unsigned char* sim; uint64_t size; };

static pthread_mutex_t g_dispatch_lock = PTHREAD_MUTEX_INITIALIZER;
static const MslsimLaunch* g_launch;
static Binding g_bindings[MSLSIM_MAX_BUFFERS];
static Region g_regions[MSLSIM_MAX_BUFFERS];
static int g_num_regions;
static uintptr_t g_window_lo, g_window_span;
static unsigned char* g_window;
static size_t g_window_len;
static volatile int g_abort;     // set by the first failing worker so the others stop early

// ------------------------------------------------------------------------------------------ workers
struct Fiber { void* sp; ThreadContext ctx; bool done; };
struct SimdGroup {
  int live_lanes, arrived;
  unsigned generation;         // bumps when a collective / simdgroup barrier completes
  uint32_t epoch;              // ordering interval for the race checker (bumps at simdgroup barriers)
  const char* file; unsigned line; const char* what;
  SimdExchange* pending;
  SimdExchange buf[2];         // alternate so a fast lane cannot overwrite values a slow lane still reads
};
struct ThreadgroupVar { const void* key; size_t offset, size; const char* name; };
// Shadow of one threadgroup-memory byte for the race / uninitialised-read checker.
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
  uint32_t tg_epoch = 0;
  const char* tg_file = nullptr;
  unsigned tg_line = 0;
  long spins = 0;
  SimdGroup* simdgroups = nullptr;
  int num_simdgroups = 0, simdgroup_capacity = 0;
  // threadgroup memory
  unsigned char* arena = nullptr;
  uintptr_t arena_lo = 0;
  size_t arena_used = 0;
  ThreadgroupVar vars[64];
  int num_vars = 0;
  unsigned char* tg_args[MSLSIM_MAX_BUFFERS] = {};
  ShadowByte* shadow = nullptr;
  bool check = false;
  // results
  bool failed = false;
  char message[1536];
  MslsimStats stats;
};
static __thread Worker* g_worker __attribute__((tls_model("initial-exec")));
static const size_t kStackSize = 256 * 1024, kPage = 4096;
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
      fail("deadlock at %s (%s:%u): the threads of this threadgroup wait for each other forever. "
           "Every live thread must reach the same barrier / SIMD-group function; one is in divergent control flow",
           what, file, line);
    int j = next_alive(w);
    if (j != w->current) switch_to(w, j);
  }
}
static bool same_site(const char* f1, unsigned l1, const char* f2, unsigned l2) {
  return l1 == l2 && (f1 == f2 || !strcmp(f1, f2));
}
static void check_no_thread_exited(Worker* w, const char* file, unsigned line) {
  if (w->alive < w->count)
    fail("threadgroup_barrier at %s:%u completed with %d of %d threads already returned: every thread of a "
         "threadgroup must reach each threadgroup_barrier (undefined behaviour on Metal)",
         file, line, w->count - w->alive, w->count);
}
static void complete_threadgroup_barrier(Worker* w) {
  w->tg_arrived = 0;
  w->tg_generation++;
  w->tg_epoch++;
}
void threadgroup_barrier(const char* file, unsigned line) {
  Worker* w = g_worker;
  w->stats.threadgroup_barriers++;
  if (w->tg_arrived == 0) {
    w->tg_file = file;
    w->tg_line = line;
  } else if (!same_site(file, line, w->tg_file, w->tg_line)) {
    fail("divergent threadgroup_barrier: this thread is at %s:%u while other threads wait at %s:%u", file, line,
         w->tg_file, w->tg_line);
  }
  unsigned seen = w->tg_generation;
  w->spins = 0;
  if (++w->tg_arrived >= w->alive) {
    check_no_thread_exited(w, file, line);
    complete_threadgroup_barrier(w);
    return;
  }
  wait_for(w, &w->tg_generation, seen, "threadgroup_barrier", file, line);
}
static void complete_simd(SimdGroup& g, bool is_barrier) {
  g.pending->participants = g.pending->arriving;   // freeze: lanes may exit before the others read
  g.pending->arriving = 0;
  g.pending->has_result = 0;
  g.arrived = 0;
  g.generation++;
  if (is_barrier) g.epoch++;
}
static SimdExchange* simd_sync(const char* what, const char* file, unsigned line, bool is_barrier) {
  Worker* w = g_worker;
  ThreadContext* c = current;
  SimdGroup& g = w->simdgroups[c->simdgroup];
  SimdExchange* b = &g.buf[c->collective_sequence++ & 1];
  if (g.arrived == 0) {
    b->arriving = 0;
    g.file = file;
    g.line = line;
    g.what = what;
  } else if (!same_site(file, line, g.file, g.line)) {
    fail("divergent SIMD-group operation: this lane is at %s (%s:%u) while other lanes of its simdgroup are at %s "
         "(%s:%u). Call SIMD-group functions in uniform control flow (the simulator does not model partial-lane "
         "collectives)", what, file, line, g.what, g.file, g.line);
  }
  b->arriving |= 1u << c->lane;
  g.pending = b;
  unsigned seen = g.generation;
  w->spins = 0;
  if (++g.arrived >= g.live_lanes) {
    complete_simd(g, is_barrier);
    return b;
  }
  wait_for(w, &g.generation, seen, what, file, line);
  return b;
}
void simdgroup_barrier(const char* file, unsigned line) { simd_sync("simdgroup_barrier", file, line, true); }
SimdExchange* simd_exchange(const void* value, size_t bytes, const char* file, unsigned line) {
  Worker* w = g_worker;
  ThreadContext* c = current;
  w->stats.simd_collectives++;
  SimdExchange* b = &w->simdgroups[c->simdgroup].buf[c->collective_sequence & 1];
  memcpy(b->slot[c->lane], value, bytes);
  return simd_sync("a SIMD-group function", file, line, false);
}

// ------------------------------------------------------------------------------------------ bindings
void* bind_buffer(int index, size_t bytes_needed, bool is_reference) {
  if (index < 0 || index >= MSLSIM_MAX_BUFFERS) fail("[[buffer(%d)]] is out of range 0..30", index);
  const Binding& b = g_bindings[index];
  if (!b.sim) fail("the kernel takes [[buffer(%d)]] but no buffer was bound at index %d", index, index);
  if (is_reference && bytes_needed > b.size)
    fail("[[buffer(%d)]] is bound to %llu bytes but the kernel reads a %zu-byte object from it", index,
         (unsigned long long)b.size, bytes_needed);
  return b.sim;
}
void* bind_threadgroup_arg(int index) {
  if (index < 0 || index >= MSLSIM_MAX_BUFFERS || !g_worker->tg_args[index])
    fail("the kernel takes [[threadgroup(%d)]] memory but no threadgroup memory length was set at index %d", index,
         index);
  return g_worker->tg_args[index];
}
static size_t arena_alloc(Worker* w, size_t size, size_t align, const char* name) {
  size_t offset = (w->arena_used + align - 1) & ~(align - 1);
  if (offset + size > kArenaSize) {
    char list[512] = "";
    size_t k = 0;
    for (int i = 0; i < w->num_vars && k < sizeof list; i++)
      k += snprintf(list + k, sizeof list - k, "%s %zu B, ", w->vars[i].name, w->vars[i].size);
    fail("threadgroup memory exceeds the %d-byte Metal limit: %s%s %zu B need %zu bytes", MSLSIM_MAX_THREADGROUP_MEMORY,
         list, name, size, offset + size);
  }
  w->arena_used = offset + size;
  return offset;
}
void* threadgroup_variable(const void* key, size_t size, size_t align, const char* name) {
  Worker* w = g_worker;
  for (int i = 0; i < w->num_vars; i++)
    if (w->vars[i].key == key) return w->arena + w->vars[i].offset;
  if (w->num_vars == 64) fail("more than 64 threadgroup variables");
  size_t offset = arena_alloc(w, size, align < 16 ? 16 : align, name);
  w->vars[w->num_vars++] = {key, offset, size, name};
  return w->arena + offset;
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
static const Region* region_for(uintptr_t a) {
  for (int i = 0; i < g_num_regions; i++)
    if (a >= g_regions[i].lo && a < g_regions[i].hi) return &g_regions[i];
  return nullptr;
}
static void out_of_bounds(uintptr_t a, unsigned n, bool store) {
  // Name the nearest buffer: the last one starting at or below the address (overrun) or else the first
  // one above it (underrun).
  const char* op = store ? "writes" : "reads";
  int below = -1, above = -1;
  for (int i = 0; i < g_num_regions; i++) {
    if (g_regions[i].lo <= a && (below < 0 || g_regions[i].lo > g_regions[below].lo)) below = i;
    if (g_regions[i].lo > a && (above < 0 || g_regions[i].lo < g_regions[above].lo)) above = i;
  }
  if (below >= 0 && (above < 0 || a - g_regions[below].hi < g_regions[above].lo - a)) {
    const Region& r = g_regions[below];
    fail("out-of-bounds device access: %s %u bytes at byte offset %llu of [[buffer(%d)]], which is %llu bytes long",
         op, n, (unsigned long long)(a - r.lo), r.first_index, (unsigned long long)(r.hi - r.lo));
  }
  const Region& r = g_regions[above];
  fail("out-of-bounds device access: %s %u bytes at byte offset -%llu of [[buffer(%d)]] (before its start)", op, n,
       (unsigned long long)(r.lo - a), r.first_index);
}
// Is an earlier access, made by a thread of `simdgroup` in barrier interval `epoch` and simdgroup interval
// `simd_epoch`, ordered before the current thread's access? Only barriers order threads: a
// threadgroup_barrier orders everyone, a simdgroup_barrier the lanes of one simdgroup.
static inline bool happened_before(const Worker* w, const ThreadContext* c, unsigned simdgroup, uint32_t epoch,
                                   uint32_t simd_epoch) {
  if (epoch != w->tg_epoch) return true;
  return simdgroup == c->simdgroup && simd_epoch != w->simdgroups[c->simdgroup].epoch;
}
static void threadgroup_access(Worker* w, uintptr_t a, unsigned n, bool store) {
  if (store) w->stats.threadgroup_bytes_written += n;
  else w->stats.threadgroup_bytes_read += n;
  if (!w->check) return;
  const ThreadContext* c = current;
  const uint16_t me = (uint16_t)c->thread_index_in_threadgroup;
  const uint32_t simd_epoch = w->simdgroups[c->simdgroup].epoch;
  const size_t off = a - w->arena_lo;
  for (unsigned i = 0; i < n; i++) {
    ShadowByte& s = w->shadow[off + i];
    const bool other_writer = s.initialized && s.writer != me &&
                              !happened_before(w, c, s.writer / MSLSIM_SIMD_WIDTH, s.write_epoch, s.write_simd_epoch);
    if (store) {
      if (other_writer)
        fail("threadgroup memory race: threads %u and %u write threadgroup byte %zu with no barrier in between",
             s.writer, me, off + i);
      if (s.read_epoch == w->tg_epoch && s.reader != me &&
          !happened_before(w, c, s.reader_simdgroup, s.read_epoch, s.read_simd_epoch))
        fail("threadgroup memory race: thread %u writes threadgroup byte %zu that %s read with no barrier in between",
             me, off + i, s.reader == kManyReaders ? "other threads" : "another thread");
      s.initialized = 1;
      s.writer = me;
      s.write_epoch = w->tg_epoch;
      s.write_simd_epoch = simd_epoch;
    } else {
      if (!s.initialized)
        fail("read of uninitialised threadgroup memory: byte %zu was never written by this threadgroup", off + i);
      if (other_writer)
        fail("threadgroup memory race: thread %u reads threadgroup byte %zu written by thread %u with no barrier in "
             "between", me, off + i, s.writer);
      if (s.read_epoch != w->tg_epoch) {
        s.read_epoch = w->tg_epoch;
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
static void mark_shadow_written(Worker* w, size_t offset, size_t size) {
  if (!w->check) return;
  for (size_t i = 0; i < size; i++) {
    ShadowByte& s = w->shadow[offset + i];
    s = ShadowByte{};
    s.initialized = 1;
    s.writer = (uint16_t)current->thread_index_in_threadgroup;
    s.write_epoch = w->tg_epoch - 1;   // atomics are ordered with everything: pretend an earlier interval
  }
}
static inline void on_access(uintptr_t a, unsigned n, bool store) {
  Worker* w = g_worker;
  if (__builtin_expect(!w || !w->in_kernel, 0)) return;
  if (a - w->arena_lo < kArenaSize) return threadgroup_access(w, a, n, store);
  if (a - g_window_lo >= g_window_span) return;     // thread-private memory (stack, registers spilled)
  const Region* r = region_for(a);
  if (!r || a + n > r->hi) return out_of_bounds(a, n, store);
  (store ? w->stats.device_bytes_written : w->stats.device_bytes_read)[r->first_index] += n;
}
// Atomics are compiled without tracing (see shim.h); they report here so the checker treats them as
// initialising and race-free.
void note_atomic(const void* p, size_t n) {
  Worker* w = g_worker;
  uintptr_t a = (uintptr_t)p;
  if (w && a - w->arena_lo < kArenaSize) mark_shadow_written(w, a - w->arena_lo, n);
  else if (a - g_window_lo < g_window_span) {
    const Region* r = region_for(a);
    if (!r || a + n > r->hi) out_of_bounds(a, (unsigned)n, true);
  }
}

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
  if (!w->arena) {
    w->arena = (unsigned char*)aligned_alloc(64, kArenaSize);
    w->arena_lo = (uintptr_t)w->arena;
    w->shadow = (ShadowByte*)calloc(kArenaSize, sizeof(ShadowByte));
  }
  return 0;
}

static void run_threadgroup(Worker* w, uint3_ tg) {
  const MslsimLaunch& L = *g_launch;
  const int n = w->count, W = MSLSIM_SIMD_WIDTH;
  w->alive = n;
  w->tg_arrived = 0;
  w->tg_epoch = 1;
  w->spins = 0;
  w->num_vars = 0;
  w->arena_used = 0;
  for (int s = 0; s < w->num_simdgroups; s++) {
    SimdGroup& g = w->simdgroups[s];
    g.arrived = 0;
    g.generation = 0;
    g.epoch = 0;
    g.pending = &g.buf[0];
    g.live_lanes = (s + 1) * W <= n ? W : n - s * W;
  }
  memset(w->arena, 0xFF, kArenaSize);   // poison: an unwritten float reads as NaN
  if (w->check) memset(w->shadow, 0, kArenaSize * sizeof(ShadowByte));
  for (int i = 0; i < MSLSIM_MAX_BUFFERS; i++) {
    w->tg_args[i] = nullptr;
    if (L.threadgroup_memory[i]) {
      size_t off = (w->arena_used + 15) & ~(size_t)15;
      w->arena_used = off + L.threadgroup_memory[i];   // sizes were checked against the limit at launch
      w->tg_args[i] = w->arena + off;
    }
  }
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
    c.collective_sequence = 0;
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
  uint32_t used = (uint32_t)w->arena_used;
  if (used > w->stats.threadgroup_memory_peak) w->stats.threadgroup_memory_peak = used;
  w->stats.threadgroups++;
}

static KernelEntry* g_entry;
static void fiber_main(Fiber* f) {
  Worker* w = g_worker;
  g_entry->entry();
  // A returning thread leaves its simdgroup's lane set and the barrier's participant count.
  f->done = true;
  w->alive--;
  SimdGroup& g = w->simdgroups[f->ctx.simdgroup];
  g.live_lanes--;
  if (g.arrived > 0 && g.arrived >= g.live_lanes) complete_simd(g, false);
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
  uint64_t total = (uint64_t)L.threadgroups[0] * L.threadgroups[1] * L.threadgroups[2];
  for (uint64_t t = w->id; t < total && !g_abort; t += job->stride) {
    uint3_ tg = {(uint32_t)(t % L.threadgroups[0]), (uint32_t)((t / L.threadgroups[0]) % L.threadgroups[1]),
                 (uint32_t)(t / ((uint64_t)L.threadgroups[0] * L.threadgroups[1]))};
    run_threadgroup(w, tg);
    if (w->failed) break;
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
  const size_t gap = 1 << 20;
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
  size_t len = gap;
  for (int g = 0; g < ng; g++) len += ((groups[g].hi - groups[g].lo + kPage - 1) & ~(kPage - 1)) + gap;
  g_window_len = len;
  g_window = (unsigned char*)mmap(nullptr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (g_window == MAP_FAILED) {
    g_window = nullptr;
    snprintf(err, n, "cannot map %zu bytes of simulated device memory", len);
    return -1;
  }
  g_window_lo = (uintptr_t)g_window;
  g_window_span = len;
  size_t pos = gap;
  g_num_regions = ng;
  for (int g = 0; g < ng; g++) {
    size_t bytes = groups[g].hi - groups[g].lo, pages = (bytes + kPage - 1) & ~(kPage - 1);
    unsigned char* sim = g_window + pos;
    if (pages && mprotect(sim, pages, PROT_READ | PROT_WRITE)) {
      snprintf(err, n, "cannot map %zu bytes of simulated device memory", pages);
      return -1;
    }
    memcpy(sim, (void*)groups[g].lo, bytes);
    g_regions[g] = {(uintptr_t)sim, (uintptr_t)sim + bytes, (unsigned char*)groups[g].lo, groups[g].first};
    for (int k = 0; k < m; k++) {
      uintptr_t lo = (uintptr_t)L->buffers[idx[k]].data;
      if (lo >= groups[g].lo && lo < groups[g].hi + (groups[g].hi == groups[g].lo))
        g_bindings[idx[k]] = {sim + (lo - groups[g].lo), L->buffers[idx[k]].size};
    }
    pos += pages + gap;
  }
  return 0;
}
static void unmap_window(bool copy_back) {
  if (copy_back)
    for (int g = 0; g < g_num_regions; g++)
      memcpy(g_regions[g].host, (void*)g_regions[g].lo, g_regions[g].hi - g_regions[g].lo);
  if (g_window) munmap(g_window, g_window_len);
  g_window = nullptr;
  g_window_lo = g_window_span = 0;
  g_num_regions = 0;
}

static Worker g_workers[2];

static int validate(const MslsimLaunch* L, char* err, size_t n) {
  g_entry = nullptr;
  for (int i = 0; i < g_num_kernels; i++)
    if (!strcmp(g_kernels[i].name, L->kernel)) g_entry = &g_kernels[i];
  if (!g_entry) {
    int k = snprintf(err, n, "kernel '%s' not found in this library; it has:", L->kernel);
    for (int i = 0; i < g_num_kernels && k < (int)n; i++) k += snprintf(err + k, n - k, " %s", g_kernels[i].name);
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
  int rc = validate(L, err, n);
  if (!rc) rc = set_function_constants(L, err, n);
  uint64_t total = (uint64_t)L->threadgroups[0] * L->threadgroups[1] * L->threadgroups[2];
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
  g_launch = nullptr;
  pthread_mutex_unlock(&g_dispatch_lock);
  return rc;
}

int mslsim_num_kernels(void) { return g_num_kernels; }
const char* mslsim_kernel_name(int i) { return i >= 0 && i < g_num_kernels ? g_kernels[i].name : nullptr; }
int mslsim_num_function_constants(void) { return g_num_constants; }
int mslsim_function_constant(int i, int32_t* index, int32_t* type, const char** name) {
  if (i < 0 || i >= g_num_constants) return -1;
  *index = g_constants[i].index;
  *type = g_constants[i].type;
  *name = g_constants[i].name;
  return 0;
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
