"""Compile .metal sources as C++ against the mslsim shim.

The prepass is line-preserving (diagnostics keep the .metal file's line numbers) and rewrites only what
the shim's macros cannot express; see include/mslsim/shim.h. Compilation has two stages: the
file's own macros and includes are expanded first (line markers kept), then the prepass runs and the
result compiles against the shim. Built libraries are cached under `build/mslsim/`, keyed on the
expanded source (so any included header counts), the shim, the runtime, the flags and the compiler.
"""
from __future__ import annotations

import bisect
import fcntl
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
INCLUDE_DIR = PACKAGE_DIR / "include"
RUNTIME_SOURCE = PACKAGE_DIR / "src" / "runtime.cpp"
REPO_ROOT = PACKAGE_DIR.parent
CACHE_DIR = Path(os.environ.get("MSLSIM_CACHE", REPO_ROOT / "build" / "mslsim"))

SHIM_FLAGS = [
    "-std=c++17", "-fPIC", "-fvisibility=hidden",
    f"-I{INCLUDE_DIR}", "-include", "mslsim/shim.h",
    # every half/bfloat operation rounds to its type (no wider intermediates)
    "-Xclang", "-ffloat16-excess-precision=none", "-Xclang", "-fbfloat16-excess-precision=none",
    # the runtime tells barriers apart by their call path: a frame-pointer chain with no tail calls
    "-fno-omit-frame-pointer", "-fno-optimize-sibling-calls",
    "-Wno-unknown-attributes", "-Wno-unknown-pragmas", "-Wno-c++20-extensions",
]
# Every object carries each kernel twice: with exact numerics (fp32 stays fp32, no contraction, libm-accurate
# transcendentals) and with GPU numerics, as Apple's compiler builds by default with fast math: `a*b+c`
# may fuse into an FMA, division may use a reciprocal, and transcendentals err by the fast-math bounds
# (shim.h). The GPU twin also profiles: line tables to tell kernel code from the shim's, no loop vectorisation
# (GPU lanes are scalar; SLP still merges adjacent loads into wide ones as Apple's compiler does), and a
# per-block instruction-mix counter (ir_mix.py), whose counts a launch returns when it profiles. A launch runs
# the GPU twin when asked for GPU numerics (MSLSIM_GPU_NUMERICS=1, or gpu_numerics=True) or a profile
# (MSLSIM_PROFILE=1, or profile=1); the exact twin, the default, carries no counters. (One twin for both: a
# third compile of every kernel cost a third of the build for a few percent of GPU-numerics simulation speed.)
EXACT_NUMERICS_FLAGS = ["-ffp-contract=off"]
GPU_NUMERICS_FLAGS = ["-ffp-contract=fast", "-mfma", "-freciprocal-math", "-DMSLSIM_GPU_NUMERICS=1",   # -mfma: contraction needs the instruction
                      "-gline-tables-only"]
# Every load/store of kernel code calls the runtime (bounds checks, byte counters, race checks);
# -fno-builtin keeps loops from becoming untraced memcpy calls, and -fno-vectorize keeps them from becoming vector
# accesses wider than the 16 bytes the tracing sees (the exact twin's loops are rolled; GPU lanes are scalar anyway).
TRACE_FLAGS = ["-fsanitize-coverage=func,trace-loads,trace-stores", "-fno-builtin", "-fno-vectorize"]
OPT_FLAGS = ["-O2"]
# Code generation of kernel code from the IR the first stage already optimised (-O2): no second run of the
# optimisation pipeline (it changed next to nothing and cost ~30% of the build), then -O0's code generator with two of
# -O2's parts: the optimising register allocator (plain -O0 gives every value a stack slot: 200 KB frames against
# 256 KB fiber stacks; with it, frames stay under 16 KB) and the DAG instruction selector (-O0's fast one would not
# fuse the GPU twin's contractable a*b+c into an FMA). Half the code-generation time of -O2 (prefill.metal's exact
# twin: 53 -> 30 s) for a few percent of simulation speed; and -O0 runs no branch folding, so no tail merging folds
# two calls of one barrier from different branches into one call (the runtime tells them apart by return address).
CODEGEN_FLAGS = ["-fPIC", "-O0", "-Xclang", "-disable-llvm-optzns", "-mllvm", "-optimize-regalloc",
                 "-mllvm", "-fast-isel=false"]
RUNTIME_FLAGS = ["-std=c++17", "-fPIC", "-fvisibility=hidden", "-fno-omit-frame-pointer", *OPT_FLAGS]
# The exact twin keeps the shader's loops rolled: full unrolling (the shaders ask for it so that Apple's compiler
# keeps fragment arrays in registers) changes no result, but was three quarters of the exact twin's compile time
# (decode.metal: IR 1.74M -> 0.40M lines, frontend 126 -> 45 s, code generation 129 -> 24 s). The GPU twin, which
# profiles, keeps the pragmas: its instruction counts are those of the unrolled code, as on the GPU.
_FULL_UNROLL = re.compile(r"^[ \t]*#pragma (?:clang loop .*\b(?:unroll\((?:full|enable)\)|unroll_count\(\d+\))|unroll\b).*$", re.M)
# Memory intrinsics (whole-struct copies, array fills) escape the load/store tracing: the kernel's LLVM IR
# is rewritten to call the runtime's traced versions instead.
_MEMORY_INTRINSIC = re.compile(r"@llvm\.(memcpy|memmove|memset)(?:\.inline)?\.[\w.]+")
_TRACED_INTRINSICS = ("declare void @mslsim_memcpy(ptr, ptr, i64, i1)\n"
                      "declare void @mslsim_memset(ptr, i8, i64, i1)\n")


class MetalCompileError(RuntimeError):
    """A .metal file did not compile; the message carries clang's diagnostics with file:line."""


def compiler() -> str:
    cxx = os.environ.get("MSLSIM_CXX") or shutil.which("clang++-19") or shutil.which("clang++")
    if not cxx:
        raise MetalCompileError("mslsim needs clang >= 19 (Debian: apt-get install clang-19); set MSLSIM_CXX to override")
    return cxx


def _compiler_identity(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout


# ------------------------------------------------------------------------------------------ prepass
def mask_comments_and_strings(src: str) -> str:
    """Same length and line structure as src, with comments and string/char literals blanked out."""
    out, i, n = list(src), 0, len(src)

    def blank(a, b):
        for k in range(a, b):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            blank(i, j)
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and src[j] != c:
                j += 2 if src[j] == "\\" else 1
            blank(i + 1, min(j, n))
            i = j + 1
        else:
            i += 1
    return "".join(out)


_THREADGROUP_ARG = re.compile(r"\[\[\s*threadgroup\s*\(")
_DECLARATOR = r"[A-Za-z_]\w*\s*(?:\[[^\]\n]*\]\s*)*"
_THREADGROUP_VAR = re.compile(  # `threadgroup T a[4], b;`: one threadgroup array per declarator
    r"\bthreadgroup\s+(?P<type>(?:const\s+|volatile\s+)*[A-Za-z_][\w:]*(?:\s*<[^;{}()]*?>)?)\s+"
    rf"(?P<declarators>{_DECLARATOR}(?:,\s*{_DECLARATOR})*);")
_NAME_AND_DIMS = re.compile(r"(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\]\n]*\]\s*)*)")
_FUNCTION_CONSTANT = re.compile(
    r"\bconstant\s+(?P<type>[A-Za-z_]\w*)\s+(?P<name>[A-Za-z_]\w*)\s*"
    r"\[\[\s*function_constant\s*\((?P<index>[^\]]*?)\)\s*\]\]\s*;")
_CONDITIONAL_BUFFER = re.compile(  # [[buffer(n), function_constant(c)]] in either order
    r"\[\[\s*(?:buffer\s*\((?P<n1>[^()]*)\)\s*,\s*function_constant\s*\((?P<c1>[^()]*)\)"
    r"|function_constant\s*\((?P<c2>[^()]*)\)\s*,\s*buffer\s*\((?P<n2>[^()]*)\))\s*\]\]")
_BUFFER = re.compile(r"\[\[\s*buffer\s*\((?P<n>[^()]*)\)\s*\]\]")
_PROGRAM_CONSTANT = re.compile(
    r"\bconstant\s+(?P<type>[A-Za-z_]\w*)\s+(?P<name>[A-Za-z_]\w*)\s*=\s*(?P<init>[^;{}]*);")
_KERNEL = re.compile(r"(?:\[\[\s*kernel\b[^\]]*\]\]|\bkernel)\s+void\s+(?P<name>[A-Za-z_]\w*)\s*\(")
_INSTANTIATION = re.compile(
    r"template\s*(?P<attrs>\[\[\s*host_name\s*\(\s*(?P<host>(?:\"[^\"]*\"\s*)+)\)\s*\]\]\s*\[\[\s*kernel\s*\]\])"
    r"\s*decltype\s*\((?P<fn>[^;]*?)\)\s*[^;]*;", re.S)


# MSL overloads functions on address spaces (`thread T& a` / `device T& a` parameters, a `threadgroup`-
# qualified `this`); here all memory is one address space and the overloads would collide. The first of
# each set of definitions that differ only in address spaces is kept (it serves every object), the others
# are dropped.
_DEFINITION_END = re.compile(r"\)\s*(?:const\s+)?(?:(?:thread|threadgroup|device|constant)\s*)?(?=[:{])"
                             r"|\b(?:struct|class)\s+\w+\s*<[^{};]*>\s*(?=\{)")
_ADDRESS_SPACE = re.compile(r"\b(?:thread|threadgroup|device|constant)\b")
_NOT_A_DEFINITION = re.compile(r"^\s*(?:if|for|while|switch|else|do|return)\b")


def _matching(masked: str, i: int, step: int) -> int:
    """Index of the bracket matching the one at masked[i], scanning forward (step 1) or backward (-1)."""
    opening, closing = ("({", ")}") if step > 0 else (")}", "({")
    depth = 0
    while True:
        if masked[i] in opening:
            depth += 1
        elif masked[i] in closing:
            depth -= 1
            if depth == 0:
                return i
        i += step


def _scopes(masked: str):
    """Function giving, for a position, the index of the innermost `{` still open there (-1: file scope)."""
    events, stack = [], [-1]
    for m in re.finditer(r"[{}]", masked):
        if m.group() == "{":
            stack.append(m.start())
        elif len(stack) > 1:
            stack.pop()
        events.append((m.start(), stack[-1]))
    positions = [e[0] for e in events]
    return lambda pos: events[bisect.bisect_left(positions, pos) - 1][1] if bisect.bisect_left(positions, pos) else -1


_ATTRIBUTE = re.compile(r"\[\[[^\[\]]*\]\]")


def _helper_parameter_attributes(masked: str) -> list:
    """(start, end) of attributes on parameters of functions that are not kernels (`uint3 tid
    [[threadgroup_position_in_grid]]` in a helper): Metal ignores them; here they would bind arguments."""
    spans, opened = [], []
    for m in re.finditer(r"[()]|\[\[[^\[\]]*\]\]", masked):
        if m.group() == "(":
            opened.append(m.start())
        elif m.group() == ")":
            if opened:
                opened.pop()
        elif opened:
            head = masked[max(masked.rfind(c, 0, opened[-1]) for c in ";{}") + 1:opened[-1]]
            if not re.search(r"\bkernel\b", head):
                spans.append((m.start(), m.end()))
    return spans


def _constant_space_buffers(masked: str) -> set:
    """Start of the attribute (`[[buffer(n)...]]`) of each kernel parameter in the `constant` address space
    (`constant T& p [[buffer(n)]]`, `const constant T* p [[buffer(n), function_constant(c)]]`): the runtime counts its
    reads as constant-cache loads."""
    starts = set()
    for m in _KERNEL.finditer(masked):
        close, depth, begin = _matching(masked, m.end() - 1, 1), 0, m.end()
        for i in range(m.end(), close + 1):   # split the parameter list at commas outside brackets
            c = masked[i]
            if c in "([{<":
                depth += 1
            elif c in ")]}>":
                depth -= 1
            if i == close or (c == "," and depth == 0):
                head, attribute, _ = masked[begin:i].partition("[[")
                if attribute and re.search(r"\bconstant\b", head):
                    starts.add(begin + len(head))
                begin = i + 1
    return starts


def _address_space_overloads(masked: str) -> list:
    """(start, end) of each function definition (or class template specialisation) that repeats an earlier one
    of its scope up to address spaces."""
    spans, seen, starts, scope = [], set(), set(), _scopes(masked)
    for m in _DEFINITION_END.finditer(masked):
        parameters = _matching(masked, m.start(), -1) if masked[m.start()] == ")" else m.start()
        start = max(masked.rfind(c, 0, parameters) for c in ";{}") + 1   # where the previous statement ends
        end = m.end()
        while masked[end] != "{":   # past a constructor's initialiser list
            if masked[end] == ";":
                break
            end = _matching(masked, end, 1) + 1 if masked[end] == "(" else end + 1
        head = masked[start:end]
        if masked[end] != "{" or start in starts or _NOT_A_DEFINITION.match(head) or not _ADDRESS_SPACE.search(head):
            continue   # (a constructor's initialiser `x(y) {` matches again: one definition, one start)
        starts.add(start)
        key = (scope(start), re.sub(r"\s+", "", _ADDRESS_SPACE.sub("", head)))
        if key in seen:
            spans.append((start, _matching(masked, end, 1) + 1))
        seen.add(key)
    return spans


@dataclass
class Prepassed:
    source: str
    kernels: list  # (host name, C++ expression naming the function)


def prepass(src: str) -> Prepassed:
    masked = mask_comments_and_strings(src)
    edits = []  # (start, end, replacement); replacements never add or remove newlines

    def same_lines(text, original):
        return text + "\n" * original.count("\n")

    for a, b in _address_space_overloads(masked) + _helper_parameter_attributes(masked):
        edits.append((a, b, same_lines("", src[a:b])))
    for m in _THREADGROUP_ARG.finditer(masked):
        edits.append((m.start(), m.end(), "[[mslsim_threadgroup_arg("))
    for m in _THREADGROUP_VAR.finditer(masked):
        text = ""
        for d in _NAME_AND_DIMS.finditer(m.group("declarators")):
            name, dims = d.group("name"), re.sub(r"\s+", "", d.group("dims"))
            text += (f"using mslsim_type_{name} = threadgroup {m.group('type')}{dims}; "
                     f"MSLSIM_THREADGROUP_VARIABLE(mslsim_type_{name}, {name}); ")
        edits.append((m.start(), m.end(), same_lines(text, m.group(0))))
    constant_space = _constant_space_buffers(masked)
    for m in _BUFFER.finditer(masked):
        if m.start() in constant_space:
            edits.append((m.start(), m.end(), same_lines(f"[[mslsim_constant_buffer({m.group('n')})]]", m.group(0))))
    for m in _CONDITIONAL_BUFFER.finditer(masked):
        n, c = m.group("n1") or m.group("n2"), m.group("c1") or m.group("c2")
        macro = "mslsim_conditional_constant_buffer" if m.start() in constant_space else "mslsim_conditional_buffer"
        edits.append((m.start(), m.end(), same_lines(f"[[{macro}({n}, {c})]]", m.group(0))))
    derived = set()   # function constants, and program-scope constants computed from them
    for m in _FUNCTION_CONSTANT.finditer(masked):
        text = f"MSLSIM_FUNCTION_CONSTANT({m.group('type')}, {m.group('name')}, {m.group('index')});"
        edits.append((m.start(), m.end(), same_lines(text, m.group(0))))
        derived.add(m.group("name"))
    for m in _PROGRAM_CONSTANT.finditer(masked):
        if derived & set(re.findall(r"[A-Za-z_]\w*", m.group("init"))):
            derived.add(m.group("name"))
            text = f"MSLSIM_DERIVED_CONSTANT({m.group('type')}, {m.group('name')}, {src[m.start('init'):m.end('init')]});"
            edits.append((m.start(), m.end(), same_lines(text, m.group(0))))
    kernels = []
    for m in _KERNEL.finditer(masked):
        if not masked[:m.start()].rstrip().endswith(">"):  # templated kernels export through instantiations
            kernels.append((m.group("name"), m.group("name")))
    for m in _INSTANTIATION.finditer(masked):
        host = "".join(re.findall(r'"([^"]*)"', src[m.start("host"):m.end("host")]))  # adjacent literals
        kernels.append((host, re.sub(r"\s+", " ", src[m.start("fn"):m.end("fn")]).strip()))
        # C++ allows no attributes on an explicit instantiation: blank them
        edits.append((m.start("attrs"), m.end("attrs"), same_lines("", m.group("attrs"))))
    edits.sort(key=lambda e: (e[0], -e[1]))
    out, pos = [], 0
    for a, b, text in edits:
        if a < pos:
            continue  # inside a span already rewritten (a helper's parameter attribute, a dropped overload)
        out += [src[pos:a], text]
        pos = b
    out.append(src[pos:])
    return Prepassed("".join(out), kernels)


# ------------------------------------------------------------------------------------------ building
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def portable_key(text: str) -> str:
    """Cache-key text with this checkout's root path replaced, so a copy of build/ into another checkout of the
    same sources (a git worktree) hits the cache. The objects still name the files of the checkout that built them
    in diagnostics; what they compute is the same, as the key covers every byte of the expanded source."""
    return text.replace(str(REPO_ROOT), "<checkout>")


def _run(cmd, what):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise MetalCompileError(f"{what} failed:\n{r.stderr.strip()}")
    return r


@functools.lru_cache(maxsize=None)
def toolchain_key(cxx: str) -> str:
    """The simulator's own inputs as one key (clang's identity, mslsim's flags, headers, runtime and IR rewriting):
    part of every object's key here and of the variant's in scripts/build_variant.py."""
    parts = [_compiler_identity(cxx), portable_key(" ".join(SHIM_FLAGS + TRACE_FLAGS + CODEGEN_FLAGS + RUNTIME_FLAGS)),
             _TRACED_INTRINSICS]
    for p in sorted((INCLUDE_DIR).rglob("*")) + [RUNTIME_SOURCE, PACKAGE_DIR / "ir_mix.py", PACKAGE_DIR / "build.py"]:
        if p.is_file():
            parts.append(p.name + _sha(p.read_bytes()))
    return _sha("\n".join(parts).encode())



def cached_build(stem: str, key: str, suffix: str, produce, cache_dir: Path = CACHE_DIR) -> Path:
    """The one cached-compile step (mslsim and scripts/build_variant.py): <cache_dir>/<stem>-<key><suffix>, made by
    produce(tmp_dir) -> a file in tmp_dir only when missing, and moved into place atomically, so a concurrent
    build never sees a partial file. A process that wants an object another one is making waits for it (a lock
    file per object) instead of compiling it again: pytest's workers ask for the same test kernels at once."""
    out = cache_dir / f"{stem}-{key}{suffix}"
    if out.exists():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    lock = os.open(cache_dir / f"{stem}-{key}.lock", os.O_RDONLY | os.O_CREAT, 0o666)   # (read-only: a shared cache)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)   # released when the descriptor closes, also if produce raises
        except OSError:   # a filesystem without flock (some network mounts): build unlocked, as before the lock
            pass
        if not out.exists():
            with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
                os.replace(produce(Path(tmp)), out)
    finally:
        os.close(lock)
    return out


def compile_to(out: Path, cmd: list, what: str) -> Path:
    """Runs a compiler command that writes `out` (its last arguments are `-o out`); returns out."""
    _run([*cmd, "-o", str(out)], what)
    return out


def runtime_object(cxx: str) -> Path:
    key = toolchain_key(cxx)
    return cached_build("runtime", key[:16], ".o", lambda tmp: compile_to(
        tmp / "runtime.o", [cxx, *RUNTIME_FLAGS, f"-I{INCLUDE_DIR}", "-c", str(RUNTIME_SOURCE)],
        "compiling the mslsim runtime"))


def preprocess(source: Path, cxx: str, include_dirs=(), defines=()) -> str:
    """Stage 1: expand the file's own macros and includes (not the shim's: <metal_stdlib> is empty here),
    keeping line markers, so the prepass sees e.g. kernel instantiations generated by macros."""
    return _run([cxx, "-E", "-x", "c++", "-std=c++17", "-D__MSLSIM__=1", "-D__METAL_VERSION__=400", "-D__HAVE_BFLOAT__=1",
                 *[f"-D{d}" for d in defines], f"-I{INCLUDE_DIR / 'preprocess'}", f"-I{source.parent}",
                 *[f"-I{Path(d).resolve()}" for d in include_dirs], str(source)], f"preprocessing {source}").stdout


def translation_unit(preprocessed: str) -> str:
    """The C++ that a preprocessed .metal file compiles as: the prepassed source, then one exported entry per
    kernel (which calls it, instantiating its argument bindings)."""
    pp = prepass(preprocessed)
    exports = "".join(f'MSLSIM_EXPORT_KERNEL_AS("{host}", {fn})\n' for host, fn in pp.kernels)
    return f"{pp.source}\n{exports}"


def metal_object(source, defines=(), include_dirs=()) -> Path:
    """Compile one .metal file (prepass, shim, tracing) into a cached object file; returns its path.
    The object registers its kernels with the runtime when loaded, so it can be linked into any library."""
    cxx = compiler()
    source = Path(source).resolve()
    text = translation_unit(preprocess(source, cxx, include_dirs, defines))
    flags = [*SHIM_FLAGS, *TRACE_FLAGS, *OPT_FLAGS, *[f"-D{d}" for d in defines]]
    toolchain = toolchain_key(cxx)
    key = _sha(portable_key("\n".join([toolchain, " ".join(flags + EXACT_NUMERICS_FLAGS + GPU_NUMERICS_FLAGS), str(source),
                                       text])).encode())[:20]

    def twin(tmp: Path, name: str, cpp_text: str, numerics: list) -> str:
        from .ir_mix import instrument
        cpp = tmp / f"{source.stem}.{name}.cpp"
        cpp.write_text(cpp_text)
        ir = compile_to(tmp / f"{name}.ll", [cxx, *flags, *numerics, "-S", "-emit-llvm", "-x", "c++", str(cpp)],
                        f"compiling {source}" + ("" if name == "exact" else f" ({name} twin)"))
        code = untrace_private(trace_memory_intrinsics(ir.read_text()))
        if name == "gpu":
            code = instrument(code)
        ir.write_text(code if name == "exact" else internalize(code))
        return str(compile_to(tmp / f"{name}.o", [cxx, *CODEGEN_FLAGS, "-c", "-x", "ir", str(ir)],
                              f"compiling {source} ({name} IR)"))

    def produce(tmp: Path) -> Path:
        # The twins compile in parallel (independent clang processes): a big shader is not one serial chain. The
        # exact twin's loops stay rolled (_FULL_UNROLL).
        with ThreadPoolExecutor(max_workers=2) as pool:
            twins = list(pool.map(lambda t: twin(tmp, *t), (("exact", _FULL_UNROLL.sub("", text), EXACT_NUMERICS_FLAGS),
                                                            ("gpu", text, GPU_NUMERICS_FLAGS))))
        return compile_to(tmp / "both.o", [cxx, "-r", "-nostdlib", *twins], f"combining {source}")

    return cached_build(source.stem, key, ".o", produce)


_COMDAT = re.compile(r"^\$.* = comdat \w+\n", re.M)
_COMDAT_USE = re.compile(r",? comdat(?:\(\$[^)]*\))?(?=[ ,\n])")
_HIDDEN_DEFINITION = re.compile(r"^(define|@[^\s=]+ =)\s+(?:(?:linkonce_odr|weak_odr)\s+)?hidden\b", re.M)


def internalize(ir: str) -> str:
    """Make every definition of a module internal (and drop its comdats), so the GPU-numerics twin of a
    kernel never merges with the exact one at link time (templates and static locals would otherwise)."""
    return _HIDDEN_DEFINITION.sub(r"\1 internal", _COMDAT_USE.sub("", _COMDAT.sub("", ir)))


# A traced load or store of thread-private memory (the kernel's arrays and structs that stay in memory) or of a
# program-scope variable (function constants, tables) checks nothing: on_access (runtime.cpp) ignores addresses outside
# the device and threadgroup slots. Those trace calls were ~70% of a kernel's and most of the simulation's time, so
# they are dropped from the IR: a call whose address has no SSA value in it (a global, a constant expression of one),
# or is an alloca, or a getelementptr / phi / select of such addresses only, in the same function (a cycle through a
# phi stays traced: a missed drop costs only time).
_ADDRESS_DEFINITION = re.compile(r"^\s*(%[-\w.$]+) = (alloca|getelementptr|phi ptr|select)\b(.*)$")
_TRACE_CALL = re.compile(r"^\s*call void @__sanitizer_cov_(?:load|store)\d+\(ptr (.*)\)(?:, !dbg !\d+)?$")


def _private_addresses(body: list) -> set:
    private, derived = set(), []
    for line in body:
        m = _ADDRESS_DEFINITION.match(line)
        if not m:
            continue
        name, op, rest = m.groups()
        if op == "alloca":
            private.add(name)
        elif op == "getelementptr":   # `getelementptr [inbounds] <type>, ptr %base, <indices>`
            base = re.search(r", ptr (%[-\w.$]+)", rest)
            derived.append((name, [base.group(1)] if base else []))
        elif op == "phi ptr":         # `phi ptr [ %a, %bb1 ], [ %b, %bb2 ]`
            derived.append((name, re.findall(r"\[ ([^,]+),", rest)))
        else:                         # `select i1 %c, ptr %a, ptr %b` (other selects have no ptr operands)
            derived.append((name, re.findall(r"ptr ([^,\s]+)", rest)))
    grown = True
    while grown:
        grown = False
        for name, sources in derived:
            if name not in private and sources and all(s in private for s in sources):
                private.add(name)
                grown = True
    return private


def untrace_private(ir: str) -> str:
    """The IR without the trace calls of accesses that cannot reach a device buffer or threadgroup memory."""
    lines, out, i = ir.split("\n"), [], 0
    while i < len(lines):
        if not lines[i].startswith("define "):
            out.append(lines[i])
            i += 1
            continue
        end = lines.index("}", i)
        body = lines[i:end + 1]
        private = _private_addresses(body)
        for line in body:
            m = _TRACE_CALL.match(line)
            if m and ("%" not in m.group(1) or m.group(1) in private):
                continue
            out.append(line)
        i = end + 1
    return "\n".join(out)


def trace_memory_intrinsics(ir: str) -> str:
    """Point the IR's memcpy/memmove/memset intrinsics at the runtime's traced versions (same arguments)."""
    ir = re.sub(r"^declare .*@llvm\.(?:memcpy|memmove|memset)\..*$", "", ir, flags=re.M)
    ir = _MEMORY_INTRINSIC.sub(lambda m: "@mslsim_memset" if m.group(1) == "memset" else "@mslsim_memcpy", ir)
    return ir + _TRACED_INTRINSICS


def build_sources(sources, name: str | None = None, defines=(), include_dirs=()) -> Path:
    """Compile one or more .metal files (and the runtime) into a shared library; returns its path."""
    cxx = compiler()
    objects = [metal_object(s, defines, include_dirs) for s in sources]
    rt = runtime_object(cxx)
    stem = name or Path(sources[0]).stem
    key = _sha("".join(o.name for o in [*objects, rt]).encode())[:20]
    return cached_build(stem, key, ".so", lambda tmp: compile_to(
        tmp / "lib.so", [cxx, "-shared", "-Wl,-Bsymbolic", *map(str, objects), str(rt), "-lpthread"],
        f"linking {stem}"))
