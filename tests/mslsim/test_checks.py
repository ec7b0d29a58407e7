"""Seeded bugs: every check of the simulator fires with a message naming kernel, threadgroup and thread,
and the process stays usable afterwards."""
import struct
from pathlib import Path

import numpy as np
import pytest

import mslsim
from mslsim import MetalCompileError, SimulationError

KERNELS = Path(__file__).parent / "kernels"


@pytest.fixture(scope="module")
def bugs():
    return mslsim.load(KERNELS / "bugs.metal")


def run(lib, kernel, threads=128, buffers=None, **kw):
    out = np.zeros(1024, np.float32)
    return lib.dispatch(kernel, 1, threads, {0: out, **(buffers or {})}, **kw)


@pytest.mark.parametrize("kernel, threads, message", [
    ("divergent_barrier", 128, r"divergent threadgroup_barrier: this thread is at .*bugs.metal:\d+ while other threads wait at .*bugs.metal:\d+"),
    ("barrier_in_helper_from_divergent_code", 128,
     r"divergent threadgroup_barrier: .*\(the same barrier reached through different calls"),
    ("barrier_after_return", 128, r"threadgroup_barrier at .*bugs.metal:\d+ completed with 28 of 128 threads already returned"),
    ("barrier_versus_collective", 32, r"threadgroup_barrier at .*bugs.metal:\d+ completed with 16 of 32 threads already returned"),
    ("shuffle_from_returned_lane", 32, r"simd_shuffle reads lane 16, which is not active"),
    ("mma_after_return", 32, r"simdgroup_multiply_accumulate with active lanes 0x0000ffff"),
    ("too_much_threadgroup_memory", 128, r"threadgroup memory exceeds the 32768-byte Metal limit: keys 16384 B, values 16400 B need 32784 bytes"),
    ("uses_unset_constant", 32, r"function constant 'needs_value' is used but no value was set"),
    ("reads_params", 32, r"no buffer was bound at index 1"),
    ("missing_barrier", 128, r"threadgroup memory race: thread \d+ reads byte \d+ of threadgroup array 'shared_values' written by thread \d+"),
    ("mem_none_barrier", 128, r"threadgroup memory race: thread \d+ reads byte \d+ of threadgroup array 'shared_values' written by thread \d+ with no barrier \(mem_threadgroup\)"),
    ("write_after_read", 128, r"threadgroup memory race: thread \d+ writes byte \d+ of threadgroup array 'shared_values' that another thread read"),
    ("device_same_output", 128, r"device memory race: threads 0 and 1 write byte 0 of \[\[buffer\(0\)\]\] with no barrier \(mem_device\)"),
    ("uninitialised_read", 128, r"read of uninitialised threadgroup memory: byte \d+ of threadgroup array 'shared_values'"),
    ("threadgroup_declarator_list", 64, r"thread 63 .*out-of-bounds threadgroup access: reads 4 bytes at byte offset 256 of threadgroup array 'a', which is 256 bytes long"),
    ("huge_thread_array", 32, r"stack overflow"),
])
def test_seeded_bug_is_reported(bugs, kernel, threads, message):
    with pytest.raises(SimulationError, match=message) as e:
        run(bugs, kernel, threads)
    assert f"kernel '{kernel}', threadgroup (0,0,0), thread " in str(e.value)


def test_write_through_a_constant_argument_is_reported():
    """The static pass rejects the seeded write through `constant float* cst`; the simulator reports it too."""
    lib = mslsim.load(KERNELS / "static" / "address_spaces.metal")
    out, cst = np.zeros(4, np.float32), np.ones(1, np.float32)
    with pytest.raises(SimulationError, match=r"write of 4 bytes to \[\[buffer\(1\)\]\], a `constant` kernel argument"):
        lib.dispatch("k", 1, 1, {0: out, 1: cst})
    assert cst[0] == 1 and not out.any()


def test_out_of_bounds_accesses_name_buffer_and_offset(bugs):
    x, out = np.zeros(64, np.float32), np.zeros(64, np.float32)
    with pytest.raises(SimulationError, match=r"thread 63 .*reads 4 bytes at byte offset 256 of \[\[buffer\(0\)\]\], which is 256 bytes long"):
        bugs.dispatch("read_past_end", 1, 64, {0: x, 1: out})
    with pytest.raises(SimulationError, match=r"writes 4 bytes at byte offset 256 of \[\[buffer\(0\)\]\]"):
        bugs.dispatch("write_past_end", 1, 64, {0: np.zeros(64, np.float32)})
    with pytest.raises(SimulationError, match=r"thread 0 .*reads 4 bytes at byte offset -12 of \[\[buffer\(0\)\]\] \(before its start\)"):
        bugs.dispatch("read_before_start", 1, 64, {0: x, 1: out})
    with pytest.raises(SimulationError, match=r"thread 63 .*reads 8 bytes at byte offset 252 of \[\[buffer\(0\)\]\], which is 256 bytes long"):
        bugs.dispatch("straddle_end", 1, 64, {0: x, 1: np.zeros(128, np.float32)})
    assert not out.any()   # a failed launch writes nothing back


@pytest.mark.parametrize("elements", [1 << 10, 1 << 20, 1 << 28, (1 << 32) - 64])
def test_out_of_bounds_at_any_distance_names_the_buffer(bugs, elements):
    """Far past the end of buffer 0 there is no other buffer's data to read by accident: still buffer 0."""
    x, out = np.zeros(64, np.float32), np.zeros(64, np.float32)
    with pytest.raises(SimulationError, match=rf"thread 0 .*reads 4 bytes at byte offset {4 * elements} of \[\[buffer\(0\)\]\]"):
        bugs.dispatch("read_far_past_end", 1, 64, {0: x, 1: out, 2: struct.pack("I", elements)})


def test_only_private_and_global_accesses_lose_their_trace_calls():
    """build.untrace_private drops a trace call only where the address cannot be a device buffer's or a threadgroup
    array's: an alloca, addresses derived from allocas only (getelementptr, phi, select), a global. Every address
    that involves an argument keeps its call (the checks above depend on it)."""
    from mslsim.build import untrace_private
    ir = """define void @k(ptr %buf, i1 %c) {
  %a = alloca [4 x float], align 16
  %g = getelementptr inbounds [4 x float], ptr %a, i64 0, i64 2
  %gg = getelementptr inbounds i8, ptr %g, i64 4
  %d = getelementptr inbounds float, ptr %buf, i64 3
  %p = phi ptr [ %a, %x ], [ %gg, %y ]
  %m = phi ptr [ %a, %x ], [ %d, %y ]
  %n = phi ptr [ %a, %x ], [ null, %y ]
  %s = select i1 %c, ptr %g, ptr %a
  %t = select i1 %c, ptr %g, ptr %buf
  call void @__sanitizer_cov_load4(ptr %a)
  call void @__sanitizer_cov_load4(ptr %gg), !dbg !7
  call void @__sanitizer_cov_store4(ptr %p)
  call void @__sanitizer_cov_load4(ptr %s)
  call void @__sanitizer_cov_load1(ptr getelementptr inbounds (i8, ptr @constant_flag, i64 1))
  call void @__sanitizer_cov_load4(ptr %buf)
  call void @__sanitizer_cov_store4(ptr %d)
  call void @__sanitizer_cov_load4(ptr %m)
  call void @__sanitizer_cov_load4(ptr %n)
  call void @__sanitizer_cov_load4(ptr %t), !dbg !8
  ret void
}
define void @other(ptr %a) {
  call void @__sanitizer_cov_load4(ptr %a)
  ret void
}"""
    kept = [line.strip() for line in untrace_private(ir).splitlines() if "__sanitizer_cov" in line]
    assert kept == ["call void @__sanitizer_cov_load4(ptr %buf)", "call void @__sanitizer_cov_store4(ptr %d)",
                    "call void @__sanitizer_cov_load4(ptr %m)", "call void @__sanitizer_cov_load4(ptr %n)",
                    "call void @__sanitizer_cov_load4(ptr %t), !dbg !8",
                    "call void @__sanitizer_cov_load4(ptr %a)"]   # @other's %a is its argument, not @k's alloca


def test_threadgroup_arrays_have_their_own_bounds(bugs):
    out = np.zeros(64, np.float32)
    bugs.dispatch("threadgroup_overflow", 1, 64, {0: out, 1: struct.pack("I", 1)})
    np.testing.assert_array_equal(out, 2 * np.arange(64, dtype=np.float32))
    # stride 2: threads 32..63 read past `tile` (in a packed layout: into block_of)
    with pytest.raises(SimulationError, match=r"reads 4 bytes at byte offset \d+ of threadgroup array 'tile', which is 256 bytes long"):
        bugs.dispatch("threadgroup_overflow", 1, 64, {0: out, 1: struct.pack("I", 2)})
    with pytest.raises(SimulationError, match=r"at byte offset \d{6,} of threadgroup array 'tile'"):
        bugs.dispatch("threadgroup_overflow", 1, 64, {0: out, 1: struct.pack("I", 100000)})


def test_struct_copy_is_bounds_checked(bugs):
    tiles, out = np.zeros((4, 31), np.float32), np.zeros((4, 31), np.float32)
    with pytest.raises(SimulationError, match=r"thread 3 .*reads 124 bytes at byte offset 496 of \[\[buffer\(0\)\]\], which is 496 bytes long"):
        bugs.dispatch("copy_struct_past_end", 1, 4, {0: tiles, 1: out})


def test_device_memory_needs_a_mem_device_barrier(bugs):
    data = np.zeros(256, np.float32)
    with pytest.raises(SimulationError, match=r"device memory race: thread \d+ reads byte \d+ of \[\[buffer\(0\)\]\] written by thread \d+"):
        bugs.dispatch("device_exchange", 1, 128, {0: data, 1: struct.pack("I", 0)})
    bugs.dispatch("device_exchange", 1, 128, {0: data, 1: struct.pack("I", 1)})
    np.testing.assert_array_equal(data[128:], np.arange(128, dtype=np.float32).reshape(-1, 2)[:, ::-1].ravel())


def test_short_constant_buffer(bugs):
    with pytest.raises(SimulationError, match=r"\[\[buffer\(1\)\]\] is bound to 4 bytes but the kernel reads a 8-byte object"):
        bugs.dispatch("reads_params", 1, 32, {0: np.zeros(32, np.float32), 1: struct.pack("I", 3)})
    out = np.zeros(32, np.float32)
    bugs.dispatch("reads_params", 1, 32, {0: out, 1: struct.pack("If", 3, 0.5)})
    assert (out == 1.5).all()


def test_wild_pointer_is_an_error_not_a_crash(bugs):
    with pytest.raises(SimulationError, match=r"invalid memory access at address 0x10 .*outside every bound buffer"):
        bugs.dispatch("wild_pointer", 1, 32, {0: np.zeros(32, np.float32), 1: struct.pack("Q", 16)})


def test_launch_limits(bugs):
    with pytest.raises(ValueError, match=r"threads per threadgroup must be 1..1024 \(Metal's limit\), got 2048"):
        run(bugs, "missing_barrier", threads=(1024, 2))
    with pytest.raises(ValueError, match=r"at most 32768 bytes"):
        run(bugs, "missing_barrier", threadgroup_memory={0: 40000})
    with pytest.raises(ValueError, match=r"kernel 'nope' is not in"):
        run(bugs, "nope")


def test_simdgroup_barrier_orders_lanes_of_one_simdgroup(bugs):
    out = np.zeros(64, np.float32)
    bugs.dispatch("simdgroup_ordered", 1, 64, {0: out}, schedule="reverse")
    np.testing.assert_array_equal(out, np.tile((np.arange(32) + 1) % 32, 2).astype(np.float32))


def test_schedules_expose_a_missing_barrier_without_the_checker(bugs):
    """With race checks off, the fiber order decides what the racy read sees: forward order hides the
    bug, reverse order exposes it (the reads see poisoned threadgroup memory)."""
    outs = {}
    for schedule in ("forward", "reverse"):
        out = np.zeros(128, np.float32)
        bugs.dispatch("missing_barrier", 1, 128, {0: out}, schedule=schedule, check_threadgroup=False)
        outs[schedule] = out
    assert np.array_equal(outs["forward"][1:], np.arange(127, dtype=np.float32))
    assert np.isnan(outs["reverse"][1:]).all()


def test_process_survives_and_keeps_working(bugs):
    for kernel in ("huge_thread_array", "divergent_barrier", "missing_barrier"):
        with pytest.raises(SimulationError):
            run(bugs, kernel, 32 if kernel == "huge_thread_array" else 128)
    out = np.zeros(64, np.float32)
    bugs.dispatch("simdgroup_ordered", 1, 64, {0: out})
    assert out[0] == 1.0


def test_compile_error_reports_file_and_line(tmp_path):
    bad = tmp_path / "broken.metal"
    bad.write_text("#include <metal_stdlib>\nusing namespace metal;\n\nkernel void k(device float* x [[buffer(0)]]) {\n"
                   "    x[0] = undefined_name;\n}\n")
    with pytest.raises(MetalCompileError, match=r"broken.metal:5:\d+: error: use of undeclared identifier 'undefined_name'"):
        mslsim.load(bad)
