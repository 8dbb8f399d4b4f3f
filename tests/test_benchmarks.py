"""Every benchmark script still runs: each at its --smoke size, its figures not asserted
(they are measured on purpose and recorded in benchmarks/RESULTS.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(path.name for path in (ROOT / "benchmarks").glob("*.py"))


def test_every_benchmark_script_is_smoke_tested():
    assert SCRIPTS == ["checkpoint_upload.py", "data_scale.py", "generation_throughput.py", "serve_load.py", "train_throughput.py"]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_the_benchmark_runs_at_its_smoke_size_and_ends_with_its_json(script, shared_records_path):
    env = {**os.environ, "RAY_ADDRESS": "local", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, f"benchmarks/{script}", "--smoke"], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert isinstance(json.loads(done.stdout.splitlines()[-1]), dict), done.stdout[-2000:]
