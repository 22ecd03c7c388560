"""What a newcomer types from the README works: `python3 dev.py tokenmeter ...` runs the command
line inside the venv (it is not on PATH), every `tokenmeter ...` line the README quotes is a real
subcommand with real options, and the `serve` banner's service-key hint is a command that runs."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from api import cli

pytestmark = [pytest.mark.unit]

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _dev_py(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # Only what a fresh shell has: no REDIS_URL/DATABASE_URL/TOKENMETER_*, so the embedded default.
    env = {k: v for k, v in os.environ.items()
           if k not in {"REDIS_URL", "DATABASE_URL"} and not k.startswith("TOKENMETER_")}
    return subprocess.run([sys.executable, str(ROOT / "dev.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings}


def test_dev_py_runs_the_command_line(tmp_path: Path) -> None:
    r = _dev_py("tokenmeter", "apikey", "--help", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "create" in r.stdout and "revoke" in r.stdout
    help_ = _dev_py("--help", cwd=tmp_path)
    assert help_.returncode == 0 and "python3 dev.py tokenmeter" in help_.stdout


def test_readme_apikey_create_works_from_the_serve_directory(tmp_path: Path) -> None:
    """The README's line, verbatim, in an empty directory: a key, in the SQLite file `serve` uses."""
    line = next(ln for ln in README.splitlines() if ln.startswith("python3 dev.py tokenmeter apikey create"))
    r = _dev_py(*shlex.split(line)[2:], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tmk_" in r.stdout and (tmp_path / "tokenmeter.sqlite3").exists()


def _readme_code_blocks() -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.S)


def _fenced_command_lines() -> list[list[str]]:
    """Each `tokenmeter ...` or `python3 dev.py tokenmeter ...` line of the README's code blocks,
    as the arguments the tokenmeter parser gets."""
    found = []
    for block in _readme_code_blocks():
        for line in block.replace("\\\n", " ").splitlines():
            if not re.match(r"\s*(python3 dev\.py )?tokenmeter ", line):
                continue
            words = shlex.split(line.split("#", 1)[0])
            if words[:3] == ["python3", "dev.py", "tokenmeter"]:
                found.append(words[3:])
            elif words[:1] == ["tokenmeter"]:
                found.append(words[1:])
    return found


def test_every_fenced_tokenmeter_line_parses() -> None:
    lines = _fenced_command_lines()
    assert lines, "the README quotes no tokenmeter command line in a code block"
    for argv in lines:
        try:
            args = cli.parser().parse_args(argv)
        except SystemExit as exc:  # argparse's way of rejecting a line
            pytest.fail(f"README: `tokenmeter {shlex.join(argv)}` is not a valid command line ({exc})")
        assert hasattr(args, "fn"), argv


def _inline_commands() -> list[str]:
    """The `tokenmeter X ...` spans outside the code blocks (the commands table, the prose), which
    carry placeholders (ACCOUNT, [--all]) and so are checked for names, not parsed."""
    prose = re.sub(r"```.*?```", "", README, flags=re.S)
    return [s for s in re.findall(r"`([^`\n]+)`", prose) if re.match(r"(python3 dev\.py )?tokenmeter \w", s)]


def test_every_inline_tokenmeter_command_names_real_subcommands_and_options() -> None:
    spans = _inline_commands()
    assert len(spans) >= 8, spans  # the table alone lists eight
    top = _subparsers(cli.parser())
    for span in spans:
        words = span.removeprefix("python3 dev.py ").split()[1:]
        if words[0] == "...":
            continue
        assert words[0] in top, f"README: `{span}`: no subcommand {words[0]!r}"
        sub = top[words[0]]
        nested = _subparsers(sub)
        if nested and len(words) > 1:
            for name in words[1].split("/"):  # `admin grant/adjust/refund`
                assert name in nested, f"README: `{span}`: no `{words[0]} {name}`"
            sub = nested[words[1].split("/")[0]]
        for opt in (w.strip("[]") for w in words if w.lstrip("[").startswith("--")):
            assert opt in _options(sub) | _options(cli.parser()), f"README: `{span}`: no option {opt}"


def test_serve_banner_names_a_command_that_runs(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    import uvicorn

    for name in ("TOKENMETER_MASTER_KEY", "TOKENMETER_JWT_SECRET", "TOKENMETER_TEST_PAYMENT_SECRET"):
        monkeypatch.setenv(name, "x" * 32)  # so serve sets nothing in os.environ for the next tests
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    assert cli.cmd_serve(cli.parser().parse_args(["serve"])) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "service keys:" in ln)
    hint = line.split("service keys:", 1)[1].split("(", 1)[0].split()
    if hint[0] == "tokenmeter":  # only where it is on PATH
        assert shutil.which("tokenmeter")
        argv = hint[1:]
    else:
        assert hint[:3] == ["python3", "dev.py", "tokenmeter"], line
        argv = hint[3:]
    assert cli.parser().parse_args(argv).fn is cli.cmd_apikey
