"""The architecture's rules, checked on the source: import contracts (pyproject's [tool.importlinter]) and
module size. docs/architecture.md states each rule; these tests keep the code to it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (ROOT / "operator" / "kiri_operator", ROOT / "runtime" / "kiri_runtime")
MAX_LINES = 500
# A module over MAX_LINES says why near its top, in a line that starts with this.
REASON_MARKER = "Why one module:"


def test_import_contracts_hold_no_cycles_pure_planning_and_one_api_client() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p.parent) for p in PACKAGES)}
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint), "--no-cache", str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in done.stdout


def long_modules_without_a_reason(packages: tuple[Path, ...], limit: int) -> list[str]:
    found = []
    for package in packages:
        for path in sorted(package.rglob("*.py")):
            lines = path.read_text().splitlines()
            if len(lines) > limit and not any(REASON_MARKER in line for line in lines[:40]):
                found.append(f"{path.relative_to(package.parent)} ({len(lines)} lines)")
    return found


def test_no_module_is_over_500_lines_without_a_reason_at_its_top() -> None:
    assert long_modules_without_a_reason(PACKAGES, MAX_LINES) == []


def test_the_size_rule_names_a_long_module_unless_it_says_why(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    body = "\n".join(f"x{i} = {i}" for i in range(MAX_LINES))
    (package / "long.py").write_text('"""A long module."""\n' + body)
    (package / "short.py").write_text('"""A short module."""\n')
    (package / "reasoned.py").write_text(f'"""A long module.\n\n{REASON_MARKER} one table.\n"""\n' + body)
    assert long_modules_without_a_reason((package,), MAX_LINES) == [f"pkg/long.py ({MAX_LINES + 1} lines)"]


def test_no_two_test_modules_share_a_file_name() -> None:
    # pytest imports a test module outside a package by its file name alone ("rootdir" import mode): a
    # second test_x.py anywhere under tests/ stops the whole run at collection ("import file mismatch").
    names: dict[str, list[str]] = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if not (path.parent / "__init__.py").exists():
            names.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    assert {name: paths for name, paths in names.items() if len(paths) > 1} == {}
