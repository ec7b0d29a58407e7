// Work-counter hook for kernels: WORK_COUNT("k_tiles_loaded", n) adds n to a named per-launch counter
// when the shader runs in the mslsim simulator (tests and benchmarks read it to prove that work is
// skipped), and compiles to nothing on Metal. Call it from one thread per event (e.g. thread 0 of a
// threadgroup) so the counts mean what their names say.
#pragma once
#ifdef __MSLSIM__
#define WORK_COUNT(name, amount) mslsim_work_count(name, amount)
#else
#define WORK_COUNT(name, amount) ((void)0)
#endif
