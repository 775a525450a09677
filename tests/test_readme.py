"""The README's first lines are the two commands a newcomer runs; CI runs the second."""

from conftest import ROOT

RUN = ".venv/bin/python bot.py --market sim"
TEST = "python3 -m venv .venv && .venv/bin/pip install -q -r requirements-dev.txt && .venv/bin/python -m pytest"


def commands() -> list[str]:
    head = (ROOT / "README.md").read_text().splitlines()[:12]
    return [line.strip() for line in head if line.startswith("    ")]


def test_readme_opens_with_the_run_and_test_commands():
    run, test = commands()[:2]
    assert run.startswith("python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && ")
    assert RUN in run
    assert test == TEST


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands()[1] in ci.splitlines()


def test_requirements_are_pinned():
    for name in ("requirements.txt", "requirements-dev.txt"):
        for line in (ROOT / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-r "):
                assert "==" in line, f"{name}: {line} is not pinned"
