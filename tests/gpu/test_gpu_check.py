"""benchmarks/gpu_check.py keeps working: a dry run of a subset of its steps (tiny sizes on the CPU), and a step that
overruns its timeout is killed and recorded while the next one still runs."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import gpu_check  # noqa: E402


@pytest.mark.slow  # over 10 s on 2 cores: CI's make test-slow runs it
def test_dry_run_writes_one_json_with_figures_and_targets(tmp_path):
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--only",
         "env,caption,image_tokens", "--out", str(tmp_path)], capture_output=True, text=True, timeout=240,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and set(report["steps"]) == {"env", "caption", "image_tokens"}
    assert all(step["status"] == "ok" for step in report["steps"].values()), report["steps"]
    assert report["environment"]["versions"]["transformers"]
    figures = {figure["name"]: figure for figure in report["figures"]}
    caption = figures["caption throughput vs fixed 576 tokens, batch 2 (x)"]
    assert caption["value"] > 0 and caption["target"] == ">= 4" and caption["met"] == (caption["value"] >= 4)
    assert figures["image tokens cfg=4 static, batch 1 (tokens/s)"]["value"] > 0
    assert "caption throughput vs fixed 576" in completed.stdout  # the printed table
    assert "[image_tokens]" in (tmp_path / "gpu_check.log").read_text()


def test_a_step_past_its_timeout_is_killed_and_recorded():
    step = dict(name="sleeper", command=[sys.executable, "-c", "import time; print('started'); time.sleep(60)"])
    log = io.StringIO()
    outcome = gpu_check.run_step(step, timeout=3, log=log)
    assert outcome["status"] == "timed out after 3 s" and outcome["seconds"] < 20
    assert "started" in outcome["output_tail"] and "[sleeper] started" in log.getvalue()
    failing = gpu_check.run_step(dict(name="failing", command=[sys.executable, "-c", "raise SystemExit(3)"]), 30, log)
    assert failing["status"] == "failed (exit status 3)"


def test_every_benchmark_step_has_its_figures():
    names = [step["name"] for step in gpu_check.steps(False, Path("results"))]
    assert names == [step["name"] for step in gpu_check.steps(True, Path("results"))]
    assert set(names) - {"env", "tests"} == set(gpu_check.FIGURES)


@pytest.mark.slow  # two training benchmarks on the CPU (about a minute)
def test_dry_run_measures_each_training_option_beside_its_layout(tmp_path):
    """Issue 30's options run beside the row without them: on the CPU the pure-bf16 row (Liger and FlexAttention need
    a GPU and are left out there) against the packed rows of the `training` step."""
    completed = subprocess.run(
        [sys.executable, "-P", str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--only",
         "training,training_kernels", "--out", str(tmp_path)], capture_output=True, text=True, timeout=400,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert all(step["status"] == "ok" for step in report["steps"].values()), report["steps"]
    rows = report["steps"]["training_kernels"]["result"]["results"]
    assert [(row["variant"], row["weights"], row["liger"]) for row in rows] == [("packed rows +bf16", "bf16", False)]
    figures = {figure["name"]: figure for figure in report["figures"]}
    assert figures["packed rows +bf16 / packed rows tokens/s (x)"]["value"] > 0
