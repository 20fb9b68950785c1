"""The README's set-up block: exactly two commands, the second one being what CI runs."""

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_gives_two_setup_commands_main_job_then_tests():
    main_job, tests = setup_commands()
    assert "python -m experiments.gpfq.main" in main_job
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command():
    extracted = subprocess.run(
        ["bash", "-c", "grep -A1 -m1 '^# Run the test suite\\.$' README.md | tail -n 1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert extracted == setup_commands()[1]
    assert "grep -A1 -m1 '^# Run the test suite\\.$' README.md" in (ROOT / ".ci/run").read_text()


def test_main_job_config_exists():
    config = re.search(r"--config=(\S+)", setup_commands()[0]).group(1)
    assert (ROOT / config).is_file(), config
