"""`make install` / `make uninstall` (scripts/install.sh) into a staging DESTDIR.

An install is only right if the installed pieces agree with one another:
the units name a chatd that exists and a config file that exists, the man
pages they cite are there, the config makes the unprivileged daemon use the
units' runtime directory. One install, a re-install over an administrator's
config, and an uninstall, in one test: building the package is the slow part.
"""

from __future__ import annotations

import marshal
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chatd import config as config_mod

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "/opt/chatd-test"  # not the default: proves PREFIX is honoured everywhere
CONFIG = "/etc/chatd/chatd.yaml"
UNITS = ("chatd.service", "chatd.socket", "chatd-forking.service")


def _has_make_target(target: str) -> bool:
    makefile = ROOT / "Makefile"
    return makefile.exists() and re.search(rf"^{target}:", makefile.read_text(), re.M) is not None


def run_install(action: str, destdir: Path) -> subprocess.CompletedProcess:
    """`make install`/`make uninstall` once the Makefile has them, else the script itself."""
    env = {**os.environ, "DESTDIR": str(destdir), "PREFIX": PREFIX, "PYTHON": sys.executable}
    env.pop("MAKEFLAGS", None)
    if _has_make_target(action):
        argv = ["make", "--no-print-directory", "-C", str(ROOT), action,
                f"DESTDIR={destdir}", f"PREFIX={PREFIX}", f"PYTHON={sys.executable}"]
    else:
        argv = ["bash", str(ROOT / "scripts" / "install.sh"), action]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def staged(destdir: Path, path: str) -> Path:
    """Where a final absolute path lies inside the staging directory."""
    assert path.startswith("/"), path
    return destdir / path.lstrip("/")


def unit_values(path: Path) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def all_files(destdir: Path) -> set[Path]:
    return {p for p in destdir.rglob("*") if p.is_file() or p.is_symlink()}


@pytest.mark.timeout(600)  # two installs, each a virtual environment from the registry
def test_install_reinstall_and_uninstall(tmp_path: Path) -> None:
    destdir = tmp_path / "dest"
    run_install("install", destdir)
    installed = all_files(destdir)

    # the commands: links into a relocated virtual environment
    libdir = f"{PREFIX}/lib/chatd"
    for command in ("chatd", "chatctl", "chat-client"):
        link = staged(destdir, f"{PREFIX}/bin/{command}")
        assert os.readlink(link) == f"{libdir}/bin/{command}"
        script = staged(destdir, f"{libdir}/bin/{command}")
        assert script.read_text().splitlines()[0] == f"#!{libdir}/bin/python"
    python = staged(destdir, f"{libdir}/bin/python")
    for script in staged(destdir, f"{libdir}/bin").iterdir():
        if script.is_file() and not script.is_symlink():
            assert str(destdir) not in script.read_text(errors="replace"), script

    # the compiled modules name their final path: tracebacks and coverage tools point there
    compiled = list(staged(destdir, libdir).rglob("*.pyc"))
    assert any(p.parent.parent.name == "chatd" for p in compiled), "chatd is not compiled"
    for pyc in compiled:
        filename = marshal.loads(pyc.read_bytes()[16:]).co_filename
        assert filename.startswith(f"{libdir}/"), (pyc, filename)

    # the units name what was installed
    for unit in UNITS:
        path = staged(destdir, f"{PREFIX}/lib/systemd/system/{unit}")
        text = path.read_text()
        assert not re.search(r"@[A-Z_]+@", text), unit  # every placeholder substituted
        values = unit_values(path)
        for key in ("ExecStart", "ExecStartPre"):
            for command in values.get(key, []):
                argv = command.split()
                assert argv[0] == f"{PREFIX}/bin/chatd"
                assert os.access(staged(destdir, os.readlink(staged(destdir, argv[0]))),
                                 os.X_OK)
                assert argv[argv.index("-c") + 1] == CONFIG
        for doc in " ".join(values.get("Documentation", [])).split():
            name, section = re.fullmatch(r"man:(.+)\((\d)\)", doc).groups()
            assert staged(destdir, f"{PREFIX}/share/man/man{section}/{name}.{section}").exists()
        for pidfile in values.get("PIDFile", []):
            settings = config_mod.load(str(staged(destdir, CONFIG)))
            assert settings.pidfile == pidfile

    # the man pages, and the files their FILES sections promise at install time
    for page in ("chatd.8", "chatctl.8", "chatd.yaml.5"):
        section = page.rsplit(".", 1)[1]
        installed_page = staged(destdir, f"{PREFIX}/share/man/man{section}/{page}")
        assert installed_page.read_text() == (ROOT / "man" / page).read_text()
        files = installed_page.read_text().split(".Sh FILES", 1)[1].split(".Sh ", 1)[0]
        for path in re.findall(r"^\.It Pa (/etc/\S+)", files, re.M):
            assert staged(destdir, path).exists(), (page, path)
    if (ROOT / "man" / "chat-client.1").exists():
        assert staged(destdir, f"{PREFIX}/share/man/man1/chat-client.1").exists()

    # the config: the example, with the units' runtime directory; valid for the installed code
    config = staged(destdir, CONFIG)
    settings = config_mod.load(str(config))
    assert settings.runtime_dir == "/run/chatd"
    example = (ROOT / "etc" / "chatd.yaml").read_text()
    assert config.read_text() == example.replace("runtime_dir: null",
                                                 "runtime_dir: /run/chatd")
    assert staged(destdir, f"{PREFIX}/share/doc/chatd/chatd.yaml").read_text() == example
    checked = subprocess.run([str(python), "-m", "chatd", "check-config", "-c", str(config)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert "runtime_dir: /run/chatd" in checked.stdout

    # a re-install keeps the administrator's config as it is
    mine = config.read_text() + "# the administrator's own\n"
    config.write_text(mine)
    run_install("install", destdir)
    assert config.read_text() == mine
    assert all_files(destdir) == installed

    # uninstall removes everything but that config
    run_install("uninstall", destdir)
    assert all_files(destdir) == {config}
    assert config.read_text() == mine
    assert not staged(destdir, libdir).exists()


def test_uninstall_leaves_a_foreign_chatd_alone(tmp_path: Path) -> None:
    """A `chatd` in bindir that is not our link, and a libdir without our marker, stay."""
    destdir = tmp_path / "dest"
    bindir = staged(destdir, f"{PREFIX}/bin")
    bindir.mkdir(parents=True)
    (bindir / "chatd").write_text("#!/bin/sh\n")
    foreign = staged(destdir, f"{PREFIX}/lib/chatd")
    foreign.mkdir(parents=True)
    (foreign / "keep").write_text("")
    run_install("uninstall", destdir)
    assert (bindir / "chatd").exists() and (foreign / "keep").exists()


@pytest.mark.parametrize("action", ["", "remove"])
def test_install_script_usage(action: str) -> None:
    result = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"),
                             *([action] if action else [])],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "usage:" in result.stderr
