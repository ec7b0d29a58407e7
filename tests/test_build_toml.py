"""build.toml as kernel-builder reads it: its own parser (the kernels-data crate bundled in the pinned `kernels`
wheel) accepts it, edition 5, Metal only, and every source the Metal build needs is listed: kernel-builder
copies only the listed files into its build, so an #include of an unlisted file fails on a Mac — and here."""
import json
import re
import shutil
import tomllib
from pathlib import Path

import pytest

from tests.helpers import REPO

INCLUDE = re.compile(r'^\s*#\s*(?:include|import)\s*"([^"]+)"', re.M)
COMPILED = (".metal", ".mm", ".cpp")
GENERATED = {"registration.h"}   # written into the build by kernel-builder (scripts/kernel_builder/ on Linux)


def listed_sources(config: dict) -> list[str]:
    return list(config["torch"]["src"]) + [s for kernel in config["kernel"].values() for s in kernel["src"]]


def unresolved_includes(root: Path, config: dict) -> list[str]:
    """Quoted includes reachable from the listed .metal/.mm/.cpp files that resolve to no listed file. They resolve
    from the including file's folder, or a kernel's `include` entries (relative to build.toml's folder): the
    only include paths kernel-builder adds."""
    root = root.resolve()
    listed = {(root / s).resolve() for s in listed_sources(config)}
    include_dirs = [root / d for kernel in config["kernel"].values() for d in kernel.get("include", [])]
    problems, seen = [], set()
    pending = [p for p in listed if p.suffix in COMPILED and p.is_file()]
    while pending:
        source = pending.pop()
        if source in seen:
            continue
        seen.add(source)
        for name in set(INCLUDE.findall(source.read_text())) - GENERATED:
            found = next((c for c in ((d / name).resolve() for d in [source.parent, *include_dirs])
                          if c in listed and c.is_file()), None)
            if found is None:
                problems.append(f"{source.relative_to(root)} includes \"{name}\", which is not a listed source")
            else:
                pending.append(found)
    return problems


def build_problems(root: Path) -> list[str]:
    """Everything that would stop kernel-builder (or break our Metal-only rule) on a Mac."""
    from kernels._rust import Build   # kernel-builder's parser: edition-5 keys, backend names, required fields
    try:
        Build.open(str(root))
    except ValueError as error:
        return [f"kernel-builder rejects build.toml: {error}"]
    config = tomllib.loads((root / "build.toml").read_text())
    problems = []
    if config["general"].get("edition") != 5:
        problems.append("build.toml needs edition = 5 in [general]")
    backends = [config["general"]["backends"], *[[k["backend"]] for k in config["kernel"].values()]]
    if any(b != ["metal"] for b in backends):   # kernel-builder builds every listed backend, cpu included
        problems.append(f"backends must be metal only, got {backends}")
    sources = listed_sources(config)
    problems += [f"{s} is listed twice" for s in sorted(set(sources)) if sources.count(s) > 1]
    problems += [f"{s} is listed but does not exist" for s in sources if not (root / s).is_file()]
    shaders = [Path(s).name for s in sources if s.endswith(".metal")]   # each .air is named by its basename
    problems += [f"two shaders named {n}" for n in sorted(set(shaders)) if shaders.count(n) > 1]
    return problems + unresolved_includes(root, config)


def test_build_toml_is_what_kernel_builder_needs():
    assert build_problems(REPO) == []


def test_every_file_of_the_metal_build_is_listed():
    """Nothing under metal-flash-sdpa/ is left out, except the simulator's stand-ins for the Metal launcher."""
    from scripts.build_variant import SIMULATOR_SWAP
    config = tomllib.loads((REPO / "build.toml").read_text())
    simulator_only = {s for swapped in SIMULATOR_SWAP.values() for s in swapped}
    on_disk = {str(p.relative_to(REPO)) for p in (REPO / "metal-flash-sdpa").rglob("*") if p.is_file()}
    assert on_disk - simulator_only == set(listed_sources(config)) - set(config["torch"]["src"])


def test_flake_lock_pins_kernel_builder():
    lock = json.loads((REPO / "flake.lock").read_text())
    builder = lock["nodes"][lock["nodes"]["root"]["inputs"]["kernel-builder"]]["locked"]
    assert (builder["owner"], builder["repo"]) == ("huggingface", "kernels") and len(builder["rev"]) == 40
    assert builder["narHash"].startswith("sha256-")


MUTATIONS = {
    "unlisted header": (lambda t: t.replace('    "metal-flash-sdpa/common/strided.h",\n', ""),
                        'includes "common/strided.h", which is not a listed source'),
    "unknown key": (lambda t: t.replace('backend = "metal"', 'backend = "metal"\ncuda-capabilities = ["8.0"]'),
                    "kernel-builder rejects build.toml"),
    "cpu backend": (lambda t: t.replace('backends = ["metal"]', 'backends = ["metal", "cpu"]'), "metal only"),
    "no edition": (lambda t: t.replace("edition = 5\n", ""), "edition = 5"),
    "missing file": (lambda t: t.replace('"metal-flash-sdpa/decode.h",', '"metal-flash-sdpa/decode.h",\n    "x.h",'),
                     "x.h is listed but does not exist"),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_the_check_has_teeth(tmp_path, mutation):
    """A copy of the build inputs with one mistake is caught, with a message that says what is wrong."""
    config = tomllib.loads((REPO / "build.toml").read_text())
    for source in ["build.toml", *listed_sources(config)]:
        (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / source, tmp_path / source)
    mutate, expected = MUTATIONS[mutation]
    (tmp_path / "build.toml").write_text(mutate((REPO / "build.toml").read_text()))
    assert any(expected in p for p in build_problems(tmp_path)), build_problems(tmp_path)
