// Work-counter hook, as the shipped kernels use it: counts in the simulator, nothing on a GPU.
#pragma once
#ifdef __MSLSIM__
#define WORK_COUNT(name, amount) mslsim_work_count(name, amount)
#else
#define WORK_COUNT(name, amount) ((void)0)
#endif
