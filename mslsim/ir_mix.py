"""Per-basic-block instruction mix of a kernel's LLVM IR, and the instrumentation that counts it at run time.

The GPU-numerics twin of a kernel (build.py), which also profiles, is compiled with line tables; every basic
block that holds kernel arithmetic gets a call `mslsim_profile_block(@mix)` at its top, where @mix is the block's count of
instructions per class (MSLSIM_ARITHMETIC_CLASSES in runtime.h). Executed arithmetic = block executions x mix,
exact for the IR that runs. The mix is LLVM-IR-level after clang -O2 for x86-64 (loop vectorisation off):
an approximation of what Apple's compiler emits, not Apple's ISA. Rules:
  - only instructions whose debug location is kernel code count: the shim's implementation of Metal
    functions (mslsim/include) does not; the runtime counts those operations itself (matrix loads/stores and
    multiply-accumulates, SIMD-group functions, barriers);
  - an instruction without a debug location (the optimiser made or moved it and dropped its line: a hoisted
    sign extension, a merged address offset) counts as kernel code unless it is the shim's: every use of its value
    is shim code and every operand a constant or a value of shim code, directly or through other such instructions
    (e.g. the sign extension of the lane's element index a simdgroup matrix load or multiply-accumulate computes its
    element addresses with). Kernel values passed through it (an offset the kernel computed) keep it counted;
  - exception: calls to transcendental functions count wherever they were inlined from (the shim implements
    metal::exp with libm, and that call is the transcendental the kernel asked for);
  - exception: the element conversions of Metal's vector constructors (float2(h2), half4(f4), float4(i), written
    in include/mslsim/vector_constructors.h) count as `convert`, one per element, as the scalar cast float(x) in
    kernel code does; the constructor's other instructions (element moves) stay free, and conversions elsewhere
    in the shim (inside a simdgroup matrix load or multiply-accumulate, counted by the runtime) do not count;
  - exception: Metal's element-wise math functions (min, max, clamp, abs, fma, floor, mix, sign, divide, ..., their
    fast:: and precise:: spellings and Apple's __metal_* intrinsics of them, written in
    include/mslsim/math_functions.h) are the kernel's arithmetic when the call comes from kernel code: an
    instruction written there counts when the first location of its inlining chain (inlinedAt) outside that file
    is kernel code, by its class, except that compares and conversions are free (the select of a compare-select
    pair is its one compare_select, as is the min/max intrinsic LLVM folds the pair into; element conversions
    are how the shim computes, e.g. bfloat through fp32; half's fma is an fma intrinsic on double, exact, which the
    intrinsic rule below classes fp16 like every non-float one). Per element, as an Apple GPU executes them:
    min/max/fmin/fmax 1 compare_select, clamp and saturate 2, abs 1 (fp class for floats: it is fabs;
    compare_select for integers), fma 1 fp32 (fp16 for half), floor/ceil/round/rint/trunc/fabs/divide 1 fp,
    fract 2 fp, mix 2 fp (x + (y - x) * a, as written in kernel code: a sub and an FMA), sign 2 compare_select.
    The same functions called by the shim itself (simd_max's reduction, counted by the runtime as a SIMD-group
    function) are free;
  - vector instructions count one per element (Apple GPU ALUs are scalar per lane);
  - a contracted multiply-add is one FMA: an fadd/fsub (flag contract or fast) reading a counted fmul (contract
    or fast) of its own basic block that has no other use counts 0, the fmul's 1 standing for the FMA (what the
    backend fuses: the GPU twin is built with -ffp-contract=fast; per block, as instruction selection fuses, so a
    product hoisted out of a loop leaves the loop's add counted; half pairs too, though x86 fuses only fp32);
  - loads and stores are not in the mix: the runtime traces them exactly, with their widths;
  - free in this model: phi, bitcast/trunc, vector element moves, unconditional branches, constant-offset
    address arithmetic. A getelementptr with a variable index counts one 64-bit add per such index;
  - a division or remainder by a constant counts as a multiply (of its width): LLVM's IR keeps `udiv %x, 18`,
    and every backend, Apple's included, lowers it to a multiply-high and shifts; only a runtime divisor is an
    int_div.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from .build import INCLUDE_DIR

RUNTIME_HEADER = INCLUDE_DIR / "mslsim" / "runtime.h"
VECTOR_CONSTRUCTORS = "/mslsim/vector_constructors.h"   # under INCLUDE_DIR
MATH_FUNCTIONS = "/mslsim/math_functions.h"             # under INCLUDE_DIR


def arithmetic_classes() -> list:
    """The class names, in order, from runtime.h's MSLSIM_ARITHMETIC_CLASSES (the one list)."""
    text = RUNTIME_HEADER.read_text()
    body = re.search(r"#define MSLSIM_ARITHMETIC_CLASSES\(X\)((?:.*\\\n)*.*)", text).group(1)
    return re.findall(r"X\((\w+)\)", body)


CLASSES = arithmetic_classes()
_INDEX = {name: i for i, name in enumerate(CLASSES)}

_FP_OPS = {"fadd", "fsub", "fmul", "fdiv", "frem", "fneg"}
_INT_ADD_OPS = {"add", "sub", "and", "or", "xor", "shl", "lshr", "ashr"}
_DIV_OPS = {"udiv", "sdiv", "urem", "srem"}
_CONVERT_OPS = {"sitofp", "uitofp", "fptosi", "fptoui", "fpext", "fptrunc"}
_TRANSCENDENTAL = re.compile(r"@(?:llvm\.(?:exp|exp2|exp10|log|log2|log10|sin|cos|tan|pow|sqrt|tanh)\.|"
                             r"(?:exp|exp2|exp10|expm1|log|log2|log10|log1p|sin|cos|tan|tanh|sinh|cosh|pow|sqrt|"
                             r"atan|atan2|asin|acos|erf)f?\()")
_COMPARE_INTRINSIC = re.compile(r"@llvm\.(?:smin|smax|umin|umax|minnum|maxnum|minimum|maximum|abs)\.")
_FP_INTRINSIC = re.compile(r"@llvm\.(?:fma|fmuladd|fabs|floor|ceil|trunc|rint|round|roundeven|copysign)\.")
_TYPE = r"(?:<(\d+) x ([\w]+)>|([\w]+))"
_DBG = re.compile(r"!dbg !(\d+)")
_METADATA = re.compile(r"^!(\d+) = (?:distinct )?!(\w+)\((.*)\)$", re.M)
_FIELD = re.compile(r"(\w+): (!\d+|\"[^\"]*\"|[\w.-]+)")


def _elements(m) -> tuple:
    """(element count, element type) of a matched _TYPE."""
    return (int(m.group(1)), m.group(2)) if m.group(1) else (1, m.group(3))


def _int_bits(type_name: str) -> int:
    return int(type_name[1:]) if re.fullmatch(r"i\d+", type_name) else 0


def classify(inst: str) -> tuple:
    """(class name or None, count) of one IR instruction line (without the `%x = ` prefix)."""
    op = inst.split(None, 1)[0]
    if op in ("tail", "musttail", "notail"):
        inst = inst.split(None, 1)[1]
        op = "call"
    if op == "call":
        if _TRANSCENDENTAL.search(inst):
            return "transcendental", 1
        m = re.match(rf"call (?:\w+ )*{_TYPE}", inst)
        n, elem = _elements(m) if m else (1, "void")
        if _COMPARE_INTRINSIC.search(inst):
            return "compare_select", n
        if _FP_INTRINSIC.search(inst):
            return ("fp32" if elem == "float" else "fp16"), n
        return None, 0
    if op in ("br", "switch"):
        return ("branch", 1) if op == "switch" or inst.startswith("br i1") else (None, 0)
    if op == "getelementptr":
        variable = len(re.findall(r"\bi(?:64|32|16|8) %", inst))
        return ("int64_add", variable) if variable else (None, 0)
    m = re.match(rf"{op} (?:(?:fast|nnan|ninf|nsz|arcp|contract|afn|reassoc|nuw|nsw|exact|disjoint|eq|ne|[uos]?[gl][te]|"
                 rf"one|oeq|ueq|une|ord|uno|true|false) )*{_TYPE}", inst)
    if not m:
        return None, 0
    n, elem = _elements(m)
    if op in _FP_OPS:
        return ("fp32" if elem in ("float", "double") else "fp16"), n
    if op in ("icmp", "fcmp"):
        return "compare_select", n
    if op == "select":   # `select i1 %c, T a, T b` or `select <n x i1> ...`
        return "compare_select", n
    if op in _CONVERT_OPS:
        return "convert", n
    if op in ("sext", "zext"):   # widening to 64 bits (address formation) is an instruction; narrower is free
        return ("int64_add", n) if re.search(r" to (?:<\d+ x )?i64", inst) else (None, 0)
    bits = _int_bits(elem)
    if op in _INT_ADD_OPS and bits:
        return ("int64_add" if bits > 32 else "int32_add"), n
    if op == "mul" and bits:
        return ("int64_mul" if bits > 32 else "int32_mul"), n
    if op in _DIV_OPS:
        constant_divisor = re.search(r",\s*(?:-?\d+|<[^>]*>)\s*(?:,|$)", inst)   # `udiv i32 %x, 18`
        if constant_divisor and bits:
            return ("int64_mul" if bits > 32 else "int32_mul"), n
        return "int_div", n
    return None, 0


def _files(ir: str) -> tuple:
    """(metadata id -> (kind, fields)), used to resolve a !dbg location to its file name."""
    return {int(m.group(1)): (m.group(2), dict(_FIELD.findall(m.group(3)))) for m in _METADATA.finditer(ir)}


def _location_file(meta: dict, node: int, cache: dict) -> str:
    """File name of a DILocation's scope (its innermost location: where the instruction's code was written)."""
    if node in cache:
        return cache[node]
    kind, fields = meta.get(node, ("", {}))
    if kind == "DIFile":
        name = str(Path(fields.get("directory", '""').strip('"')) / fields.get("filename", '""').strip('"'))
    elif "file" in fields and kind != "DILocation":
        name = _location_file(meta, int(fields["file"][1:]), cache)
    elif "scope" in fields:
        name = _location_file(meta, int(fields["scope"][1:]), cache)
    else:
        name = ""
    cache[node] = name
    return name


def _caller_file(meta: dict, node: int, cache: dict) -> str:
    """File of the first location, out along the inlining chain (inlinedAt) from `node`, not in math_functions.h:
    where the kernel (or the shim) called the math function. A chain that ends inside the file (an out-of-line
    copy of a function, which -O2 does not leave for these one-liners) gives the file itself: not counted."""
    while True:
        file_name = _location_file(meta, node, cache)
        inlined_at = meta.get(node, ("", {}))[1].get("inlinedAt")
        if not file_name.endswith(MATH_FUNCTIONS) or inlined_at is None:
            return file_name
        node = int(inlined_at[1:])


def _counted_class(name: str, body: str, file_name: str, caller):
    """The class an instruction of class `name` written in file_name counts as, or None (the docstring's rules);
    caller() is the file of the call into math_functions.h."""
    if name == "transcendental" or not file_name.startswith(str(INCLUDE_DIR)):
        return name
    if file_name.endswith(VECTOR_CONSTRUCTORS):
        return name if name == "convert" else None
    if file_name.endswith(MATH_FUNCTIONS) and not caller().startswith(str(INCLUDE_DIR)):
        free = body.startswith(("icmp ", "fcmp ")) or name == "convert"   # the docstring's rule for math functions
        return None if free else name
    return None


_LABEL = re.compile(r"^([\w.$-]+|\d+):")
_SHIM_ONLY_EXCEPTIONS = (MATH_FUNCTIONS, VECTOR_CONSTRUCTORS)   # shim files whose instructions may count
_DEFINITION = re.compile(r"^\s*(%[\w.$-]+) = ", re.M)
_VALUE = re.compile(r"%[\w.$-]+")
# `fmul`/`fadd`/`fsub` that may contract (flag contract, or fast: all flags); group 2 holds its operands
_CONTRACTABLE = re.compile(r"(fmul|fadd|fsub) (?:(?:nnan|ninf|nsz|arcp|afn|reassoc) )*(?:contract|fast) [^%]*(.*)")


def _operands(body: str) -> list:
    """The local values an instruction reads (its text without the trailing `, !dbg !n` attachments)."""
    return _VALUE.findall(body.split(", !", 1)[0])


def _use_counts(lines: list) -> Counter:
    """Uses of every local value in one function's body lines (an instruction reading it twice: two uses): its
    occurrences but the definition (a block label's also count the `; preds = ...` comments: unused here)."""
    text = "\n".join(lines)
    uses = Counter(_VALUE.findall(text))
    uses.subtract(_DEFINITION.findall(text))
    return uses


def _fused_with(body: str, block_products: set, uses: dict) -> bool:
    """A contractable fadd/fsub reading a counted contractable fmul of its own block that has no other use: the
    backend fuses the pair into one FMA, which the fmul's count stands for (the docstring's contraction rule)."""
    m = _CONTRACTABLE.match(body)
    return bool(m) and m.group(1) != "fmul" and any(
        value in block_products and uses.get(value) == 1 for value in _operands(m.group(2)))


def _shim_only(lines: list, meta: dict, cache: dict) -> set:
    """The values of one function's instructions without a debug location that belong to shim code: every use is
    shim code (an instruction located in mslsim/include, outside the files whose instructions may count) and every
    operand a constant, a block label or a value of shim code, directly or through other such values (the
    docstring's rule for instructions without a location)."""
    shim_values, unlocated, labels, uses, operands = set(), set(), set(), {}, {}
    for line in lines:
        inst = line.strip()
        label = _LABEL.match(line)
        if label:
            labels.add("%" + label.group(1))
            continue
        if not inst or inst.startswith(";"):
            continue
        definition = _DEFINITION.match(line)
        name = definition.group(1) if definition else None
        m = _DBG.search(inst)
        if m:
            file_name = _location_file(meta, int(m.group(1)), cache)
            shim = file_name.startswith(str(INCLUDE_DIR)) and not file_name.endswith(_SHIM_ONLY_EXCEPTIONS)
            user = "shim" if shim else "kernel"
            if shim and name:
                shim_values.add(name)
        else:
            user = name or "kernel"   # an unlocated store, branch or call: kernel code
        values = _operands(inst.split(" = ", 1)[1] if name else inst)
        if name and not m:
            unlocated.add(name)
            operands[name] = values
        for value in values:
            uses.setdefault(value, []).append(user)
    # The largest such set (values of a chain or a loop of them vouch for each other): drop violators until none is.
    shim_only, changed = set(unlocated), True
    while changed:
        changed = False
        for name in list(shim_only):
            if name not in uses or any(u != "shim" and u not in shim_only for u in uses[name]) or \
                    any(v not in shim_values and v not in shim_only and v not in labels for v in operands[name]):
                shim_only.discard(name)
                changed = True
    return shim_only


def instrument(ir: str) -> str:
    """The IR with a mslsim_profile_block call at the top of every block that holds counted instructions."""
    meta, cache = _files(ir), {}
    lines = ir.split("\n")
    out, globals_ = [], []
    in_function, function_file, block, insert_at = False, "", None, None
    uses, products = {}, set()   # the function's use counts; the block's counted contractable fmuls
    shim_only = set()            # the function's unlocated values that are the shim's (_shim_only)

    def close_block():
        if block is not None and any(block):
            name = f"@mslsim_mix.{len(globals_)}"
            globals_.append(f"{name} = private unnamed_addr constant [{len(CLASSES)} x i32] ["
                            + ", ".join(f"i32 {c}" for c in block) + "]")
            out.insert(insert_at, f"  call void @mslsim_profile_block(ptr {name})")

    for index, line in enumerate(lines):
        if line.startswith("define "):
            in_function = True
            m = _DBG.search(line)
            function_file = _location_file(meta, int(m.group(1)), cache) if m else ""
            end = lines.index("}", index)
            uses, products = _use_counts(lines[index + 1:end]), set()
            shim_only = _shim_only(lines[index + 1:end], meta, cache)
            out.append(line)
            block, insert_at = [0] * len(CLASSES), len(out)
            continue
        if not in_function:
            out.append(line)
            continue
        if line == "}":
            close_block()
            in_function, block = False, None
            out.append(line)
            continue
        if _LABEL.match(line):
            close_block()
            out.append(line)
            block, insert_at, products = [0] * len(CLASSES), len(out), set()
            continue
        out.append(line)
        inst = line.strip()
        if not inst or inst.startswith(";"):
            continue
        body = inst.split(" = ", 1)[1] if re.match(r"%[\w.$-]+ = ", inst) else inst
        if body.startswith(("phi ", "landingpad ")):
            insert_at = len(out)
            continue
        name, count = classify(body)
        if not name:
            continue
        m = _DBG.search(inst)
        if not m and inst.split(" = ", 1)[0] in shim_only:
            continue
        file_name = _location_file(meta, int(m.group(1)), cache) if m else function_file
        counted = _counted_class(name, body, file_name, lambda: _caller_file(meta, int(m.group(1)), cache) if m else file_name)
        if counted and _fused_with(body, products, uses):
            continue
        if counted:
            block[_INDEX[counted]] += count
            if body.startswith("fmul ") and _CONTRACTABLE.match(body):
                products.add(inst.split(" = ", 1)[0])
    declaration = "declare void @mslsim_profile_block(ptr)"
    return "\n".join(out) + "\n" + "\n".join(globals_) + "\n" + declaration + "\n"
