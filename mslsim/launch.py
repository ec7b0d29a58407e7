"""Load a built kernel library and dispatch its kernels (ctypes over the runtime's C ABI)."""
from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass, field

MAX_BUFFERS = 31
MAX_COUNTERS = 16
MAX_PROFILE_COUNTERS = 64   # at least MSLSIM_NUM_PROFILE_COUNTERS (the last field of MslsimStats: extra slots stay 0)
MAX_THREADS = 1024
MAX_THREADGROUP_MEMORY = 32768
SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}
# MslsimType code -> (name, struct format)
CONSTANT_TYPES = {1: ("bool", "?"), 2: ("int", "i"), 3: ("uint", "I"), 4: ("float", "f"), 5: ("half", "e"),
                  6: ("short", "h"), 7: ("ushort", "H"), 8: ("char", "b"), 9: ("uchar", "B")}


class SimulationError(RuntimeError):
    """A launch failed: bad launch parameters, or the kernel did something undefined on a GPU."""


class _Buffer(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("size", ctypes.c_uint64)]


class _Constant(ctypes.Structure):
    _fields_ = [("index", ctypes.c_int32), ("type", ctypes.c_int32), ("value", ctypes.c_uint8 * 8)]


class _Launch(ctypes.Structure):
    _fields_ = [("kernel", ctypes.c_char_p), ("threadgroups", ctypes.c_uint32 * 3), ("threads", ctypes.c_uint32 * 3),
                ("buffers", _Buffer * MAX_BUFFERS), ("threadgroup_memory", ctypes.c_uint32 * MAX_BUFFERS),
                ("constants", ctypes.POINTER(_Constant)), ("num_constants", ctypes.c_int32),
                ("workers", ctypes.c_int32), ("schedule", ctypes.c_int32), ("seed", ctypes.c_uint32),
                ("check_threadgroup", ctypes.c_int32), ("gpu_numerics", ctypes.c_int32), ("profile", ctypes.c_int32),
                ("threadgroup_subset", ctypes.POINTER(ctypes.c_uint64)), ("num_threadgroup_subset", ctypes.c_uint64)]


class _Stats(ctypes.Structure):
    _fields_ = [("threadgroups", ctypes.c_uint64), ("fiber_switches", ctypes.c_uint64),
                ("threadgroup_barriers", ctypes.c_uint64), ("simd_collectives", ctypes.c_uint64),
                ("device_bytes_read", ctypes.c_uint64 * MAX_BUFFERS),
                ("device_bytes_written", ctypes.c_uint64 * MAX_BUFFERS),
                ("threadgroup_bytes_read", ctypes.c_uint64), ("threadgroup_bytes_written", ctypes.c_uint64),
                ("threadgroup_memory_peak", ctypes.c_uint32), ("num_counters", ctypes.c_uint32),
                ("counters", ctypes.c_uint64 * MAX_COUNTERS), ("profiled", ctypes.c_uint32),
                ("threads_per_threadgroup", ctypes.c_uint32), ("profile", ctypes.c_uint64 * MAX_PROFILE_COUNTERS)]


@dataclass
class LaunchStats:
    """What one launch did. Byte counts are what the kernel's loads and stores touched, per buffer index."""
    threadgroups: int
    fiber_switches: int
    threadgroup_barriers: int
    simd_collectives: int
    device_bytes_read: dict = field(default_factory=dict)
    device_bytes_written: dict = field(default_factory=dict)
    threadgroup_bytes_read: int = 0
    threadgroup_bytes_written: int = 0
    threadgroup_memory_peak: int = 0
    counters: dict = field(default_factory=dict)  # kernel work counters by name
    # profile=True: per-thread instruction counts by name (see MslsimProfileCounter in runtime.h), plus the
    # launch geometry a cost model needs (threads_per_threadgroup, threadgroup_memory, threadgroups)
    profile: dict = field(default_factory=dict)

    @property
    def total_device_bytes_read(self) -> int:
        return sum(self.device_bytes_read.values())


@dataclass(frozen=True)
class FunctionConstantInfo:
    index: int
    type: str
    name: str


def _as_buffer(index, obj, keep):
    """(pointer, byte size) for a numpy array, CPU torch tensor, or bytes-like object (setBytes)."""
    if hasattr(obj, "data_ptr") and hasattr(obj, "is_contiguous"):  # torch.Tensor
        if obj.device.type != "cpu":
            raise TypeError(f"buffer {index}: tensor is on {obj.device}; the simulator needs CPU tensors")
        if not obj.is_contiguous():
            raise ValueError(f"buffer {index}: tensor is not contiguous; a Metal buffer is raw memory (call .contiguous())")
        return obj.data_ptr() or ctypes.addressof(keep.setdefault("empty", ctypes.c_char())), obj.numel() * obj.element_size()
    if hasattr(obj, "__array_interface__"):  # numpy array
        if not obj.flags.c_contiguous:
            raise ValueError(f"buffer {index}: array is not C-contiguous; a Metal buffer is raw memory")
        if not obj.flags.writeable:
            raise ValueError(f"buffer {index}: array is read-only; pass a writable array (np.ascontiguousarray(x).copy())")
        return obj.ctypes.data, obj.nbytes
    if isinstance(obj, ctypes.Structure):
        obj = bytes(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        data = bytes(obj)
        holder = ctypes.create_string_buffer(data, max(len(data), 1))
        keep[index] = holder
        return ctypes.addressof(holder), len(data)
    raise TypeError(f"buffer {index}: expected a numpy array, a CPU torch.Tensor or bytes, got {type(obj).__name__}")


def _triple(name, value):
    v = (value,) if isinstance(value, int) else tuple(value)
    if not 1 <= len(v) <= 3 or any(not isinstance(x, int) or x < 0 for x in v):
        raise ValueError(f"{name} must be 1 to 3 non-negative ints, got {value!r}")
    return v + (1,) * (3 - len(v))


class Library:
    """A compiled kernel library (one shared object, possibly several .metal files)."""

    def __init__(self, path):
        self.path = str(path)
        self._lib = ctypes.CDLL(self.path, mode=ctypes.RTLD_LOCAL)
        L = self._lib
        L.mslsim_dispatch.argtypes = [ctypes.POINTER(_Launch), ctypes.POINTER(_Stats), ctypes.c_char_p, ctypes.c_size_t]
        L.mslsim_kernel_name.restype = ctypes.c_char_p
        L.mslsim_counter_name.restype = ctypes.c_char_p
        L.mslsim_profile_counter_name.restype = ctypes.c_char_p
        self.profile_counters = []
        while name := L.mslsim_profile_counter_name(len(self.profile_counters)):
            self.profile_counters.append(name.decode())
        if len(self.profile_counters) > MAX_PROFILE_COUNTERS:
            raise RuntimeError(f"{self.path} has {len(self.profile_counters)} profile counters; raise MAX_PROFILE_COUNTERS")
        L.mslsim_function_constant.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int32),
                                               ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_char_p)]
        self.kernels = [L.mslsim_kernel_name(i).decode() for i in range(L.mslsim_num_kernels())]
        constants = {}
        for i in range(L.mslsim_num_function_constants()):
            idx, typ, name = ctypes.c_int32(), ctypes.c_int32(), ctypes.c_char_p()
            L.mslsim_function_constant(i, ctypes.byref(idx), ctypes.byref(typ), ctypes.byref(name))
            constants[idx.value] = FunctionConstantInfo(idx.value, CONSTANT_TYPES[typ.value][0], name.value.decode())
        self.function_constants = dict(sorted(constants.items()))

    def _encode_constants(self, constants):
        arr = (_Constant * max(len(constants), 1))()
        codes = {name: code for code, (name, _) in CONSTANT_TYPES.items()}
        for k, (index, value) in enumerate(sorted(constants.items())):
            info = self.function_constants.get(index)
            if info is None:
                raise ValueError(f"function constant {index} is not declared by any kernel of {self.path}; "
                                 f"declared: {sorted(self.function_constants)}")
            if info.type == "bool" and not isinstance(value, bool):
                raise TypeError(f"function constant {index} ('{info.name}') is bool; got {value!r}")
            fmt = CONSTANT_TYPES[codes[info.type]][1]
            try:
                packed = struct.pack("<" + fmt, value)
            except struct.error as e:
                raise ValueError(f"function constant {index} ('{info.name}', {info.type}): {value!r}: {e}") from None
            arr[k].index, arr[k].type = index, codes[info.type]
            arr[k].value[:len(packed)] = list(packed)
        return arr

    def dispatch(self, kernel: str, threadgroups, threads, buffers: dict, constants: dict | None = None,
                 threadgroup_memory: dict | None = None, workers: int = 0, schedule: str = "forward",
                 seed: int = 0, check_threadgroup: bool = True, gpu_numerics: bool = False,
                 profile: bool = False, only_threadgroups=None) -> LaunchStats:
        """Run `kernel` over a grid of `threadgroups` of `threads` each (dispatchThreadgroups).

        buffers: {index: array/tensor/bytes}; outputs are written back in place.
        constants: {function constant index: value}; threadgroup_memory: {index: bytes}.
        schedule: fiber order between synchronisation points ("forward", "reverse", "random") to expose
        missing barriers; check_threadgroup: detect races (threadgroup and device memory inside a threadgroup)
        and uninitialised threadgroup reads; gpu_numerics: run the GPU-numerics twins (FMA contraction, fast-math
        error bounds; also chosen for every launch by the environment variable MSLSIM_GPU_NUMERICS=1);
        profile: run the GPU-numerics twins and return their executed-instruction counts in `.profile`
        (also chosen by MSLSIM_PROFILE=1); only_threadgroups: run only these threadgroups (linear ids
        x + X * (y + Y * z), see threadgroup_ids), the others write nothing (also MSLSIM_THREADGROUPS="id,id,...").
        """
        if kernel not in self.kernels:
            raise ValueError(f"kernel '{kernel}' is not in {self.path}; it has {self.kernels}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
        L = _Launch()
        L.kernel = kernel.encode()
        L.threadgroups[:] = _triple("threadgroups", threadgroups)
        L.threads[:] = _triple("threads", threads)
        n = L.threads[0] * L.threads[1] * L.threads[2]
        if not 1 <= n <= MAX_THREADS:
            raise ValueError(f"threads per threadgroup must be 1..{MAX_THREADS} (Metal's limit), got {n} ({tuple(L.threads)})")
        keep = {}
        for index, obj in buffers.items():
            if not 0 <= index < MAX_BUFFERS:
                raise ValueError(f"buffer index {index} is out of range 0..{MAX_BUFFERS - 1}")
            L.buffers[index].data, L.buffers[index].size = _as_buffer(index, obj, keep)
        for index, nbytes in (threadgroup_memory or {}).items():
            if not 0 <= index < MAX_BUFFERS or not 0 <= nbytes <= MAX_THREADGROUP_MEMORY:
                raise ValueError(f"threadgroup memory {index}: {nbytes} bytes; indices 0..30, at most {MAX_THREADGROUP_MEMORY} bytes")
            L.threadgroup_memory[index] = nbytes
        consts = self._encode_constants(constants or {})
        L.constants, L.num_constants = consts, len(constants or {})
        L.workers, L.schedule, L.seed, L.check_threadgroup = workers, SCHEDULES[schedule], seed, int(check_threadgroup)
        L.gpu_numerics, L.profile = int(gpu_numerics), int(profile)
        if only_threadgroups is not None:
            subset = (ctypes.c_uint64 * max(len(only_threadgroups), 1))(*only_threadgroups)
            L.threadgroup_subset, L.num_threadgroup_subset = subset, len(only_threadgroups)
        stats, err = _Stats(), ctypes.create_string_buffer(2048)
        if self._lib.mslsim_dispatch(ctypes.byref(L), ctypes.byref(stats), err, len(err)):
            raise SimulationError(err.value.decode(errors="replace"))
        names = [self._lib.mslsim_counter_name(i).decode() for i in range(stats.num_counters)]
        return LaunchStats(
            threadgroups=stats.threadgroups, fiber_switches=stats.fiber_switches,
            threadgroup_barriers=stats.threadgroup_barriers, simd_collectives=stats.simd_collectives,
            device_bytes_read={i: stats.device_bytes_read[i] for i in buffers},
            device_bytes_written={i: stats.device_bytes_written[i] for i in buffers},
            threadgroup_bytes_read=stats.threadgroup_bytes_read,
            threadgroup_bytes_written=stats.threadgroup_bytes_written,
            threadgroup_memory_peak=stats.threadgroup_memory_peak,
            counters={name: stats.counters[i] for i, name in enumerate(names)},
            profile=profile_dict(self.profile_counters, stats) if stats.profiled else {})


def threadgroup_ids(grid, columns) -> list[int]:
    """Linear ids of every threadgroup of `grid` (1 to 3 ints) whose x position is in `columns`."""
    X, Y, Z = _triple("grid", grid)
    return [x + X * (y + Y * z) for z in range(Z) for y in range(Y) for x in columns]


def profile_dict(names, stats) -> dict:
    """Profile counts by name plus the launch geometry (one definition, used by Library.dispatch)."""
    return {**{name: stats.profile[i] for i, name in enumerate(names)},
            "threadgroups": stats.threadgroups, "threads_per_threadgroup": stats.threads_per_threadgroup,
            "threadgroup_memory": stats.threadgroup_memory_peak}
