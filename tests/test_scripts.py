"""The shell scripts — the README's two commands, CI's entry point and scripts/mac_check.sh, which only a Mac can
run — parse (bash -n) and pass shellcheck (installed by scripts/setup.sh), so a Mac user's first run does not
stop on a script error."""
import shutil
import subprocess

import pytest

from tests.helpers import REPO

SCRIPTS = sorted(REPO.glob("scripts/*.sh")) + [REPO / ".ci" / "run"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_passes_shellcheck(script):
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    assert shutil.which("shellcheck"), "shellcheck missing: scripts/setup.sh installs it (apt-get install shellcheck)"
    lint = subprocess.run(["shellcheck", "--severity=style", str(script)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


def test_mac_check_covers_every_step_the_readme_promises():
    text = (REPO / "scripts" / "mac_check.sh").read_text()
    for step in ["xcrun metal -std=metal4.0", "nix run .#build-and-copy", "-m pytest", "benchmarks/run.py",
                 "report.md"]:
        assert step in text, step


def test_shellcheck_catches_a_seeded_mistake(tmp_path):
    broken = tmp_path / "broken.sh"
    broken.write_text((REPO / "scripts" / "mac_check.sh").read_text().replace('"$OUT/air/', "$OUT/air/", 1)
                      .replace('rm -rf "$OUT"', "rm -rf $OUT"))
    assert subprocess.run(["shellcheck", str(broken)], capture_output=True).returncode != 0


def test_no_script_directory_module_shadows_the_standard_library():
    """`python3 benchmarks/run.py` puts benchmarks/ first on sys.path, so a module there named like a standard one
    (benchmarks/profile.py once) is what torch's own `import profile` gets: the CLI died in its memory step while
    the in-process tests passed. Every directory whose scripts run as files is checked."""
    import sys
    for directory in ["benchmarks", "scripts", "tests", "."]:
        shadows = [f.name for f in (REPO / directory).glob("*.py") if f.stem in sys.stdlib_module_names]
        assert not shadows, (directory, shadows)
