"""What an operator sees when a `regcache` command is used wrongly or has nothing to do: usage
errors instead of tracebacks, plain words for an empty store, and each command's --help naming
only the options that command uses. Run as the operator runs it: the installed entry point in a
subprocess, so a traceback would show."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from regcachelib import cli
from regcachelib.store import Store

SRC = str(Path(cli.__file__).resolve().parents[1])


def regcache(*argv: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("REGCACHE_DIR", None)
    return subprocess.run([sys.executable, "-m", "regcachelib.cli", *argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=60)


@pytest.fixture
def empty_cache(tmp_path):
    Store(str(tmp_path / "cache")).close()
    return tmp_path / "cache"


@pytest.mark.parametrize("size", ["1gigs", "-5GiB", "lots"])
def test_gc_bad_size_is_a_usage_error(empty_cache, size):
    r = regcache("gc", "--dir", str(empty_cache), f"--max-size={size}")
    assert r.returncode == 2
    assert r.stderr.startswith("usage: regcache gc") and "argument --max-size: expected a size such as 50GiB" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_gc_on_an_empty_store_says_so(empty_cache):
    r = regcache("gc", "--dir", str(empty_cache), "--max-size", "0")
    assert r.returncode == 0 and r.stdout == f"nothing to do: the store at {empty_cache} is empty, nothing cached yet (limit 0 B)\n"


# which shared option each command's help must show (and no other)
USES = {
    "stats": {"--dir", "--config"},
    "ls": {"--dir"},
    "warm": {"--dir", "--config", "--quiet", "--no-progress"},
    "export": {"--dir", "--config", "--quiet", "--no-progress"},
    "import": {"--dir", "--config", "--quiet", "--no-progress"},
    "gc": {"--dir", "--config"},
    "tier-gc": {"--config"},
    "pin": {"--dir"},
    "unpin": {"--dir"},
    "verify": {"--dir", "--quiet", "--no-progress"},
    "client-config": {"--quiet"},
    "ca": {"--quiet"},
}
SHARED = {"--dir", "--config", "--quiet", "--no-progress"}


@pytest.mark.parametrize("command", sorted(USES))
def test_each_command_help_shows_only_the_shared_options_it_uses(command):
    r = regcache(command, "--help")
    assert r.returncode == 0
    shown = {option for option in SHARED if f" {option}" in r.stdout}
    assert shown == USES[command], r.stdout


def test_every_command_is_covered_and_shared_options_still_work_before_the_command(empty_cache):
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert set(commands) == set(USES)
    r = regcache("--dir", str(empty_cache), "-q", "ls")
    assert r.returncode == 0 and r.stdout == "nothing cached\n"
