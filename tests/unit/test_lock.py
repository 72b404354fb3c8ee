"""The environment the suite runs in is exactly the committed lock (constraints.txt)."""

import re
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "megatron-sep"


def read_lock(path=ROOT / "constraints.txt") -> dict:
    pins = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
        assert m, f"constraints.txt line {n} is not `name==version`: {line!r}"
        name = canonicalize_name(m[1])
        assert name not in pins, f"constraints.txt pins {name} twice"
        pins[name] = m[2]
    return pins


def installed():
    """The distributions installed in the environment's site-packages. Not `sys.path` as it is during the suite:
    once a test imports setuptools (torch's extension and compile builders do), its vendored packages (jaraco-*,
    zipp, tomli, ...) sit on `sys.path` as distributions nobody installed."""
    sites = sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")})
    return metadata.distributions(path=sites)


def test_every_installed_distribution_is_pinned_at_its_version():
    pins = read_lock()
    unpinned, wrong = [], []
    for dist in installed():
        name = canonicalize_name(dist.metadata["Name"])
        if name == PROJECT:
            continue
        if name not in pins:
            unpinned.append(f"{name}=={dist.version}")
        elif not SpecifierSet(f"=={pins[name]}").contains(dist.version, prereleases=True):
            wrong.append(f"{name}: installed {dist.version}, locked {pins[name]}")
    assert not unpinned, (
        f"installed but not in constraints.txt: {unpinned}. Fix: `make lock`, then `make test`"
    )
    assert not wrong, (
        f"installed versions differ from constraints.txt: {wrong}. Fix: `make env` reinstalls"
    )


def test_every_declared_requirement_is_locked_and_allowed_by_setup_py():
    """Each requirement of the project and of its `test` extra (what `make env` installs) is pinned, at a
    version setup.py's range admits."""
    pins = read_lock()
    requires = [Requirement(r) for r in metadata.requires(PROJECT) or []]
    assert requires, "the project is not installed (pip install -e '.[test]')"
    for req in requires:
        if req.marker is not None and not req.marker.evaluate({"extra": "test"}):
            continue  # another extra (deepspeed): not part of the locked environment
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} (from setup.py) is missing from constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside setup.py's {req.specifier}"
        )


def test_lock_parser_catches_bad_lines(tmp_path):
    bad = tmp_path / "c.txt"
    bad.write_text("torch==2.13.0\nnumpy>=2\n")
    with pytest.raises(AssertionError, match="line 2"):
        read_lock(bad)


def setup_extras() -> dict:
    """setup.py's extras_require, read without running setup()."""
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text())
    kw = next(
        k
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        for k in n.keywords
        if k.arg == "extras_require"
    )
    return ast.literal_eval(kw.value)


def test_install_commands_name_the_clone_and_real_extras():
    """The package is not on PyPI: docs and messages say `pip install -e '.[x]'`, never
    `pip install 'megatron-sep[x]'`, and every extra they name exists in setup.py (issue 39)."""
    extras = setup_extras()
    assert extras["tensorboard"] == ["tensorboard>=2.21"]
    for name, reqs in extras.items():  # each extra's packages are locked, at a version it admits
        for req in map(Requirement, reqs):
            pin = read_lock().get(canonicalize_name(req.name))
            assert pin and req.specifier.contains(pin), f"[{name}] {req} vs the lock's {pin}"
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "launch").iterdir()]
    files += [*(ROOT / "megatron_sep").rglob("*.py"), *(ROOT / "fused_ops").rglob("*.py")]
    files += [*(ROOT / "benchmarks").glob("*.*"), *(ROOT / "tests").rglob("*.py")]
    named = set()
    for f in files:
        if not f.is_file() or f == Path(__file__):
            continue
        text = f.read_text(errors="replace")
        assert "megatron-sep[" not in text, f"{f.relative_to(ROOT)} names megatron-sep[...]"
        named |= {e for m in re.findall(r"\.\[([\w,-]+)\]", text) for e in m.split(",")}
        if f == ROOT / "README.md":  # its list of extras: `pip install -e '.[test]'`, `[gpu]`, ...
            extras_line = next(line for line in text.splitlines() if line.startswith("Extras"))
            named |= set(re.findall(r"`\[(\w+)\]`", extras_line))
    assert {"deepspeed", "tensorboard", "fp8"} <= named
    assert named <= set(extras), f"extras named but not in setup.py: {named - set(extras)}"
