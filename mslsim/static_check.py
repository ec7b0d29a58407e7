"""Static MSL validity pass: what compiles as C++ here but Apple's Metal compiler rejects (or we must
not use). Three layers:

1. lexical rules on the source and the project headers it includes (comments and strings ignored):
   double, std::, new/delete, exceptions, printf, virtual, function-pointer declarators, goto, kernels that
   do not return void; and C/C++ standard headers (from the preprocessed source's line markers);
2. clang -fsyntax-only with Metal address spaces mapped to clang address spaces
   (device/constant/threadgroup pointers do not mix, also not through explicit casts, found in the AST;
   writes through constant are rejected; a kernel buffer pointer without an address space is rejected;
   whole-struct copies between address spaces are valid MSL and pass) and variable-length arrays as errors;
3. the LLVM IR call graph of the kernel code: recursion and indirect calls are rejected.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

from .build import INCLUDE_DIR, SHIM_FLAGS, compiler, mask_comments_and_strings, preprocess, translation_unit

LEXICAL_RULES = [
    (re.compile(r"\bdouble\b"), "'double' is not supported in MSL; use float"),
    (re.compile(r"\bstd\s*::"), "the C++ standard library (std::) is not available in MSL; use metal::"),
    (re.compile(r"\bnew\b"), "'new': dynamic allocation is not available in MSL"),
    (re.compile(r"\bdelete\b"), "'delete': dynamic allocation is not available in MSL"),
    (re.compile(r"\b(?:throw|try|catch)\b"), "exceptions are not available in MSL"),
    (re.compile(r"\bprintf\b"), "printf is not available in MSL kernels"),
    (re.compile(r"\bvirtual\b"), "virtual functions are not supported in MSL"),
    (re.compile(r"\(\s*\*\s*[A-Za-z_]\w*\s*\)\s*\("), "function pointers are not supported in MSL"),
    (re.compile(r"\bgoto\b"), "'goto' is not supported in MSL"),
]
# A kernel returns void (in the prepassed source; explicit instantiations use decltype).
_NON_VOID_KERNEL = re.compile(r"(?:\[\[\s*kernel\s*\]\]|\bkernel)\s+(?!void\b|decltype\b)[A-Za-z_][\w:<>, ]*?\s*[*&]?\s*"
                              r"[A-Za-z_]\w*\s*\(")
_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)
_SHIM_PREFIXES = ("mslsim", "metal::", "std::", "__", "operator\"\"", "mtl")


def _project_files(path: Path, include_dirs) -> list:
    """The file and, recursively, the project headers it includes with #include "..."."""
    seen, todo = [], [path.resolve()]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.append(f)
        for name in _LOCAL_INCLUDE.findall(f.read_text()):
            for d in (f.parent, *map(Path, include_dirs)):
                if (d / name).exists():
                    todo.append((d / name).resolve())
                    break
    return seen


def _lexical(files) -> list:
    problems = []
    for f in files:
        masked = mask_comments_and_strings(f.read_text())
        for lineno, line in enumerate(masked.splitlines(), 1):
            if line.lstrip().startswith("#"):
                continue
            for pattern, message in LEXICAL_RULES:
                if pattern.search(line):
                    problems.append(f"{f}:{lineno}: {message}")
        for m in _NON_VOID_KERNEL.finditer(masked):
            problems.append(f"{f}:{masked.count(chr(10), 0, m.start()) + 1}: a kernel function must return void")
    return problems


_LINE_MARKER = re.compile(r'^# (?P<line>\d+) "(?P<file>[^"]*)"(?P<flags>(?: \d)*)$')


def _standard_headers(preprocessed: str, allowed_dirs) -> list:
    """Headers entered from outside the project and mslsim (the line markers of the preprocessed source tell,
    after #if): C/C++ standard headers, which MSL does not have."""
    allowed = lambda name: any(Path(name).resolve().is_relative_to(d) for d in allowed_dirs)   # noqa: E731
    problems, file, line = [], "", 0
    for text in preprocessed.splitlines():
        m = _LINE_MARKER.match(text)
        if not m:
            line += 1
            continue
        name = m.group("file")
        if " 1" in m.group("flags") and name.startswith("/") and allowed(file) and not allowed(name):
            problems.append(f"{file}:{line}: C/C++ standard headers are not available in MSL ({name}); "
                            f"include <metal_stdlib>")
        file, line = name, int(m.group("line"))
    return problems


# clang's AST dump prints a location's file and line only when they change: `file:L:C`, `line:L:C`, `col:C`.
_DUMP_LOCATION = re.compile(r"(?P<file>/[^\s<>,:]+):(?P<file_line>\d+):\d+|\bline:(?P<line>\d+):\d+")


def _address_space_casts(ast_dump: str, files) -> list:
    """Explicit casts between address spaces in the project's files: C++ accepts a C-style cast from a
    threadgroup to a device pointer (reinterpret), Metal does not."""
    project = {str(f) for f in files}
    where, problems = ("", 0), []
    for line in ast_dump.splitlines():
        begin = None
        for m in _DUMP_LOCATION.finditer(line):
            where = (m.group("file"), int(m.group("file_line"))) if m.group("file") else (where[0], int(m.group("line")))
            begin = begin or where
        if "<AddressSpaceConversion>" in line and (begin or where)[0] in project:
            file, lineno = begin or where
            problems.append(f"{file}:{lineno}: explicit cast between address spaces (device, constant, threadgroup, "
                            f"thread) is not allowed in MSL")
    return sorted(set(problems))


def _demangle(names) -> dict:
    if not names:
        return {}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out))


def _call_graph_problems(ir: str, source: Path) -> list:
    calls, indirect, current = {}, set(), None
    for line in ir.splitlines():
        m = re.match(r'define\b[^@]*@("?[^"(\s]+"?)\(', line)
        if m:
            current = m.group(1).strip('"')
            calls[current] = set()
        elif line.startswith("}"):
            current = None
        elif current and re.search(r"\b(?:call|invoke)\b", line):
            callee = re.search(r"\b(?:call|invoke)\b[^@%]*?[@%]([\w.$\"]+)\(", line)
            if callee and re.search(r"\b(?:call|invoke)\b[^@]*%[\w.]+\(", line) and not re.search(r"@llvm\.", line):
                indirect.add(current)
            elif callee:
                calls[current].add(callee.group(1).strip('"'))
    names = _demangle(sorted(calls))
    project = {f for f in calls if not names.get(f, f).startswith(_SHIM_PREFIXES) and "mslsim_" not in f}
    problems = [f"{source}: function pointer or virtual call in '{names[f]}' (not supported in MSL)"
                for f in sorted(indirect & project)]
    # recursion: a cycle in the call graph among the project's own functions
    index, low, stack, on_stack, counter, cycles = {}, {}, [], set(), [0], []

    def strongconnect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in calls.get(v, ()):
            if w not in project:
                continue
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in calls.get(v, ()):
                cycles.append(component)

    for v in sorted(project):
        if v not in index:
            strongconnect(v)
    for component in cycles:
        problems.append(f"{source}: recursion is not supported in MSL: " + " -> ".join(names[f] for f in component))
    return problems


_STRUCT_COPY_ERROR = re.compile(r"error: (?:no matching constructor for initialization of|no viable overloaded '=')")
_STRUCT_COPY_NOTE = re.compile(r"note: candidate (?:constructor|function) \(the implicit (?:(?:copy|move) (?:constructor|assignment "
                               r"operator)\) not viable: .*address space|default constructor\) not viable: requires 0)")


def _address_space_errors(stderr: str) -> list:
    """clang's errors in address-space mode, less whole-struct copies between address spaces: valid MSL
    (`Params q = p;` from constant memory), which C++ rejects only because the implicit copy constructor and
    assignment take generic references."""
    errors, notes = [], []
    for line in stderr.splitlines():
        if "error:" in line:
            errors.append(line)
            notes.append([])
        elif "note:" in line and errors:
            notes[-1].append(line)
    return [e for e, n in zip(errors, notes)
            if not (_STRUCT_COPY_ERROR.search(e) and n and all(_STRUCT_COPY_NOTE.search(x) for x in n))]


def check(path, include_dirs=()) -> list:
    """Problems found in one .metal file (an empty list means it passed), as 'file:line: message'."""
    path = Path(path).resolve()
    files = _project_files(path, include_dirs)
    problems = _lexical(files)
    cxx = compiler()
    preprocessed = preprocess(path, cxx, include_dirs)
    headers = _standard_headers(preprocessed, [INCLUDE_DIR, path.parent, *(Path(d).resolve() for d in include_dirs)])
    if headers:
        return problems + headers   # compiling would only add the headers' clashes with the shim
    text = translation_unit(preprocessed)
    with tempfile.TemporaryDirectory() as tmp:
        cpp = Path(tmp) / "check.cpp"
        cpp.write_text(text)
        r = subprocess.run([cxx, *SHIM_FLAGS, "-DMSLSIM_CHECK_ADDRESS_SPACES", "-fsyntax-only",
                            "-Werror=vla", "-Werror=vla-cxx-extension", "-Xclang", "-ast-dump", "-x", "c++", str(cpp)],
                           capture_output=True, text=True)
        problems += _address_space_errors(r.stderr) + _address_space_casts(r.stdout, files)
        r = subprocess.run([cxx, *SHIM_FLAGS, "-O0", "-S", "-emit-llvm", "-x", "c++", str(cpp), "-o", "-"],
                           capture_output=True, text=True)
        if r.returncode == 0:
            problems += _call_graph_problems(r.stdout, path)
    return problems
