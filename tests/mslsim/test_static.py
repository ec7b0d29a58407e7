"""The static MSL validity pass rejects a seeded example of each forbidden construct and passes valid
kernels."""
from pathlib import Path

import pytest

from mslsim.static_check import check

KERNELS = Path(__file__).parent / "kernels"
PROJECT_SHADERS = Path(__file__).resolve().parents[2] / "metal-flash-sdpa"


@pytest.mark.parametrize("name, expected", [
    ("double", ["'double' is not supported in MSL"]),
    ("std_namespace", ["(std::) is not available in MSL"]),
    ("new_delete", ["'new': dynamic allocation", "'delete': dynamic allocation"]),
    ("exceptions", ["exceptions are not available in MSL"]),
    ("printf", ["printf is not available"]),
    ("function_pointer", ["function pointers are not supported", "function pointer or virtual call in 'k("]),
    ("vla", ["variable length arrays"]),
    ("recursion", ["recursion is not supported in MSL: is_"]),
    ("unqualified_buffer", ["unqualified_buffer.metal:3:22: error: no viable conversion from 'BufferArg' to 'float *'"]),
    ("goto", ["goto.metal:6: 'goto' is not supported in MSL"]),
    ("non_void_kernel", ["non_void_kernel.metal:3: a kernel function must return void"]),
    ("address_space_cast", ["address_space_cast.metal:7: explicit cast between address spaces"]),
    ("builtin_type", ["must be declared as uint, ushort or one of their 2- and 3-vectors"]),
    ("std_header", ["std_header.metal:2: C/C++ standard headers are not available in MSL (/usr/"]),
])
def test_forbidden_construct_is_rejected(name, expected):
    problems = "\n".join(check(KERNELS / "static" / f"{name}.metal"))
    for text in expected:
        assert text in problems, problems


def test_address_space_mistakes_are_rejected():
    problems = check(KERNELS / "static" / "address_spaces.metal")
    lines = sorted({int(p.split("address_spaces.metal:")[1].split(":")[0]) for p in problems})
    assert lines == [9, 10, 11, 12, 13], problems   # one error per seeded mistake, none elsewhere


@pytest.mark.parametrize("path", sorted(KERNELS.glob("*.metal")) + sorted(PROJECT_SHADERS.glob("*.metal")),
                         ids=lambda p: p.name)
def test_valid_kernels_pass(path):
    assert check(path, include_dirs=[PROJECT_SHADERS / "common"]) == []


def test_rules_fire_only_where_seeded():
    """One problem per seeded mistake: the valid cast and the standard header's clashes are not reported."""
    assert len(check(KERNELS / "static" / "address_space_cast.metal")) == 1
    assert len(check(KERNELS / "static" / "std_header.metal")) == 1
