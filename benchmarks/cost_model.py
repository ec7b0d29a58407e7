"""A MODEL, not a timing: predicted kernel time on Apple GPUs from an mslsim execution profile.

Input: one launch's profile (mslsim LaunchStats.profile, per-thread instruction counts; see mslsim/README.md)
plus the bytes it must move from DRAM (loads from `constant` kernel arguments, the profile's constant_load_*, are
served by the constant cache: they cost issue slots, no DRAM bytes). Per launch:

    issue cycles (per core)   = sum over classes of (lane count / 32) x core-cycles per simdgroup instruction
    resident threadgroups     = min over threadgroup memory, threads and (when the profile carries an estimate of
                                registers per thread) the register file
    waves                     = ceil(threadgroups / (cores x threadgroups resident per core))
    issue time                = issue cycles per threadgroup x resident threadgroups x waves / clock,
                                divided by a latency-hiding factor min(1, resident simdgroups / SATURATION)
    memory time               = DRAM bytes / (DRAM bandwidth x min(1, simdgroups in flight / (cores x SATURATION)))
    predicted time            = max(issue time, memory time)      (a roofline: overlap is assumed perfect)

Each throughput below carries its source. Where no public figure exists the value is marked "estimate" and is
what a Mac run should calibrate first (benchmarks/README.md, "Calibrating the profile model").
"""
from __future__ import annotations

import math
import re
from pathlib import Path

LANES = 32
# The kernels' header: constants the host's heuristics share with this model are defined there, once.
PARAMS_HEADER = Path(__file__).resolve().parents[1] / "metal-flash-sdpa" / "common" / "params.h"


def header_constant(name: str) -> int:
    """The integer of `#define NAME value` in params.h."""
    match = re.search(rf"^#define {name} (\d+)\b", PARAMS_HEADER.read_text(), re.MULTILINE)
    if match is None:
        raise LookupError(f"no '#define {name} <integer>' line in {PARAMS_HEADER}")
    return int(match.group(1))


# Core-cycles one simdgroup instruction occupies on an Apple GPU core (4 schedulers, 32 lanes each: an
# instruction at full rate takes 1/4 core-cycle of issue). Source: philipturner/metal-benchmarks README
# (@dc2adc6), "Operations per Second" and "Integer performance" tables, measured on M1/M2 (Apple7/8);
# M3/M4 (Apple9) are assumed equal.
CYCLES_PER_SIMD_INSTRUCTION = {
    "fp32": (0.25, "metal-benchmarks: FFMA32 128 lanes/core-cycle (256 FLOP/cycle/core)"),
    "fp16": (0.25, "metal-benchmarks: FFMA16 = FFMA32 rate on M1+"),
    "int32_add": (0.25, "metal-benchmarks: IADD32 full rate"),
    "int32_mul": (1.0, "metal-benchmarks: IMUL32 quarter rate (4 cycles/scheduler)"),
    "int64_add": (0.5, "metal-benchmarks: 64-bit add is 2 32-bit ops"),
    "int64_mul": (4.0, "metal-benchmarks: IMUL 64x64 ~16 cycles/scheduler"),
    "int_div": (10.0, "estimate: emulated division, ~40 instructions/scheduler (not measured)"),
    "convert": (0.25, "metal-benchmarks: conversions at full rate (estimate for f16<->f32)"),
    "transcendental": (1.0, "metal-benchmarks: EXP2/LOG2 quarter rate"),
    "compare_select": (0.25, "metal-benchmarks: CMPSEL full rate"),
    "branch": (0.25, "estimate: one issue slot"),
    "matrix_multiply_accumulate": (512 / 102.5, "metal-benchmarks: simdgroup_matrix FFMA 102.5 of 128 per core-cycle; "
                                   "an 8x8x8 MMA is 512 FMA"),
    "matrix_load_threadgroup": (0.5, "estimate: 8x8 fragment = 256 B at 128 B/core-cycle of threadgroup memory"),
    "matrix_store_threadgroup": (0.5, "estimate: as matrix_load_threadgroup"),
    "matrix_load_device": (0.5, "estimate: as threadgroup, through L1"),
    "matrix_store_device": (0.5, "estimate: as threadgroup, through L1"),
    "simd_function": (0.5, "estimate: shuffle/reduction step at half rate"),
    "threadgroup_barrier": (2.0, "estimate: barrier issue + drain"),
    "simdgroup_barrier": (0.25, "estimate: one issue slot"),
}
# Memory instructions: issue cost per simdgroup instruction (loads and stores of any width up to 16 B per lane).
MEMORY_INSTRUCTION_CYCLES = (0.25, "estimate: one issue slot per access; bandwidth below")
MEMORY_SPACES = ("device_load", "device_store", "threadgroup_load", "threadgroup_store")
ACCESS_WIDTHS = ("1", "2", "4", "8", "16", "other")
# Loads from `constant` kernel arguments (parameter structs, strides): uniform data, the same for every thread.
CONSTANT_LOAD_CYCLES = (MEMORY_INSTRUCTION_CYCLES[0], "estimate: one issue slot per load like other memory instructions; "
                        "served by the constant cache (uniform data read by every thread), so no DRAM bytes")
THREADGROUP_BYTES_PER_CYCLE = (128, "estimate: threadgroup memory 128 B/core-cycle (32 lanes x 4 B)")

# GPUs. Core count and DRAM bandwidth: Apple spec sheets. Clock: not published by Apple; third-party figures.
GPUS = {
    "m3_max": dict(cores=40, clock_ghz=1.398, dram_gbps=409.6, source="Apple M3 Max spec (40-core GPU, 400 GB/s); "
                   "clock 1.398 GHz third-party (PERFORMANCE.md section 0)"),
    "m4_max": dict(cores=40, clock_ghz=1.578, dram_gbps=546.0, source="Apple M4 Max spec (40-core GPU, 546 GB/s); "
                   "clock ~1.58 GHz third-party"),
    # calibration only: the machines the published MLX figures come from
    "m3_ultra": dict(cores=80, clock_ghz=1.398, dram_gbps=819.2, source="two M3 Max dies (Apple spec: 80 cores, 819 GB/s)"),
}
THREADGROUP_MEMORY_PER_CORE = (header_constant("CORE_THREADGROUP_MEMORY"), "metal-benchmarks 'On-Chip Memory': ~60 KB "
                               "threadgroup memory per core (M1/M2; params.h CORE_THREADGROUP_MEMORY, as the decode split)")
MAX_THREADS_PER_CORE = (header_constant("CORE_MAX_THREADS"), "estimate: register-limited residency at ~100 "
                        "registers/thread (208 KB file; params.h CORE_MAX_THREADS, as the decode split)")
REGISTER_FILE_PER_CORE = (208 * 1024, "metal-benchmarks 'On-Chip Memory': ~208 KB register file per core (M1/M2; M3+ "
                          "allocate registers dynamically, so only indicative there)")
MAX_REGISTERS_PER_THREAD = (128, "applegpu ISA notes (Dougall Johnson): r0-r127 32-bit registers per thread; more "
                            "spill to memory (spills are not modelled)")
SATURATION_SIMDGROUPS = (header_constant("SATURATION_SIMDGROUPS"), "metal-benchmarks ILP graphs: ALU saturates near "
                         "16-24 resident simdgroups per core (params.h SATURATION_SIMDGROUPS, as the backward's chunk count)")
PREDICTED_GPUS = ("m3_max", "m4_max")


def residency(threads_per_threadgroup: int, threadgroup_memory: int, registers_per_thread: int = 0) -> int:
    """Threadgroups resident on one core: limited by threadgroup memory, by threads and, given an estimate of a
    thread's 32-bit registers, by the register file."""
    by_memory = THREADGROUP_MEMORY_PER_CORE[0] // max(threadgroup_memory, 1)
    by_threads = MAX_THREADS_PER_CORE[0] // threads_per_threadgroup
    by_registers = (REGISTER_FILE_PER_CORE[0] // (4 * registers_per_thread * threads_per_threadgroup)
                    if registers_per_thread else by_threads)
    return max(1, min(by_memory, by_threads, by_registers))


def issue_cycles(profile: dict) -> float:
    """Core-cycles of issue for the whole launch (all threadgroups)."""
    cycles = sum(profile.get(name, 0) / LANES * cost for name, (cost, _) in CYCLES_PER_SIMD_INSTRUCTION.items())
    def instructions(*spaces):
        return sum(profile.get(f"{space}_{w}", 0) for space in spaces for w in ACCESS_WIDTHS)
    cycles += instructions(*MEMORY_SPACES) / LANES * MEMORY_INSTRUCTION_CYCLES[0]
    cycles += instructions("constant_load") / LANES * CONSTANT_LOAD_CYCLES[0]
    tg_bytes = profile.get("threadgroup_load_bytes", 0) + profile.get("threadgroup_store_bytes", 0)
    return cycles + tg_bytes / THREADGROUP_BYTES_PER_CYCLE[0]


def predict_ms(profile: dict, dram_bytes: float, gpu: str) -> float:
    """MODEL: predicted milliseconds of one launch on `gpu` (not a measurement)."""
    g = GPUS[gpu]
    tgs = max(profile["threadgroups"], 1)
    resident = residency(profile["threads_per_threadgroup"], profile["threadgroup_memory"],
                         profile.get("registers_per_thread", 0))
    waves = math.ceil(tgs / (g["cores"] * resident))
    per_threadgroup = issue_cycles(profile) / tgs
    # Occupancy: the threadgroups a core actually holds (a small grid leaves slots, and cores, empty). Latency is
    # hidden, and DRAM kept busy, only with enough simdgroups in flight; the same saturation point is assumed for
    # both (estimate).
    occupied = min(resident, math.ceil(tgs / g["cores"]))
    simdgroups_per_threadgroup = math.ceil(profile["threads_per_threadgroup"] / LANES)
    hiding = min(1.0, occupied * simdgroups_per_threadgroup / SATURATION_SIMDGROUPS[0])
    issue_s = per_threadgroup * occupied * waves / (g["clock_ghz"] * 1e9) / hiding
    in_flight = min(tgs, g["cores"] * resident) * simdgroups_per_threadgroup
    memory_s = dram_bytes / (g["dram_gbps"] * 1e9 * min(1.0, in_flight / (g["cores"] * SATURATION_SIMDGROUPS[0])))
    return max(issue_s, memory_s) * 1e3


def sources() -> dict:
    """Every figure the model uses, with its source (written into profile.json)."""
    table = {name: dict(value=v, source=s) for name, (v, s) in CYCLES_PER_SIMD_INSTRUCTION.items()}
    for name, (v, s) in dict(memory_instruction=MEMORY_INSTRUCTION_CYCLES, constant_load=CONSTANT_LOAD_CYCLES,
                             threadgroup_bytes_per_cycle=THREADGROUP_BYTES_PER_CYCLE,
                             threadgroup_memory_per_core=THREADGROUP_MEMORY_PER_CORE,
                             max_threads_per_core=MAX_THREADS_PER_CORE, register_file_per_core=REGISTER_FILE_PER_CORE,
                             max_registers_per_thread=MAX_REGISTERS_PER_THREAD,
                             saturation_simdgroups=SATURATION_SIMDGROUPS).items():
        table[name] = dict(value=v, source=s)
    table["gpus"] = GPUS
    return table
