"""What a person sees: the demo's console is short, and shows progress and the summary."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROGRESS = re.compile(r"step (\d+)/(\d+) \(\d+%\) loss [\d.]+ lr [\d.e+-]+ [\d,]+ tokens/s elapsed \d+:\d\d:\d\d eta \d+:\d\d:\d\d")
# Lines the console used to flood with, each from a dependency or Ray Train's own echo.
NOISE = ("FutureWarning", "UserWarning", "Reporting training result", "Checkpoint successfully created", "Execution plan of Dataset",
         "generation flags are not valid", "Setting accelerator to CPU", "Using default tokenizer")


@pytest.mark.slow
def test_the_demos_console_is_short_and_shows_progress_and_the_summary(ray_local, tmp_path):
    """The README's demo command at a small size, joined to the session's Ray as
    `ray job submit` would join a cluster: every line it prints, as a person reads them."""
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    result = subprocess.run(
        [sys.executable, "jobs/demo.py", "--output-dir", str(tmp_path), "--num-train", "600", "--num-heldout", "8"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (result.stderr + result.stdout).splitlines()
    assert len(lines) < 80, "\n".join(lines)
    assert not [line for line in lines if any(noise in line for noise in NOISE)], "\n".join(lines)
    progress = [PROGRESS.search(line) for line in lines if PROGRESS.search(line)]
    assert progress and progress[-1][1] == progress[-1][2], "\n".join(lines)  # the last line is the last step's
    assert re.search(r"^exact_match: \d\.\d\d$", result.stdout, re.M)
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["steps"] == int(progress[-1][1]) and summary["finished"] is True
