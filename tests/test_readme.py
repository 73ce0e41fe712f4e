"""The README's usage example is examples/quickstart.py, and it runs as written."""

import pathlib
import re
import subprocess
import sys

import fastcam.cli

ROOT = pathlib.Path(__file__).resolve().parent.parent


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_example_is_the_quickstart_script():
    assert (ROOT / "examples" / "quickstart.py").read_text() in readme_python_blocks()


def test_quickstart_runs_and_trains():
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+) =", done.stdout)]
    assert len(losses) == 3 and losses[-1] < losses[0], done.stdout
    assert "maps (8, 5, 4, 4)" in done.stdout


def test_info_command_lists_every_backend(capsys):
    assert fastcam.cli.main(["info"]) == 0
    printed = capsys.readouterr().out
    for name in ("torch", "cpu", "cuda", "triton"):
        assert re.search(rf"^  {name}\b.*: (usable|not usable: .+)$", printed, flags=re.M), printed
