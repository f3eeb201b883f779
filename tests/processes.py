"""Launching a training stage in several processes, for the multi-process tests of every folder."""
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT


def run_processes(settings: dict, tmp_path, processes: int, name: str, launcher: str = "torchrun") -> list[float]:
    """Runs `tests/distributed/distributed_stage.py` in `processes` processes (torchrun, or `accelerate launch`) and
    returns the logged losses."""
    settings_file = tmp_path / f"{name}.json"
    settings_file.write_text(json.dumps(settings))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "tests")}
    port = str(29500 + hash(name) % 500)
    if launcher == "accelerate":  # --multi_gpu is accelerate's data-parallel launcher; use_cpu keeps it on CPU
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
                   "--num_processes", str(processes), "--main_process_port", port, "--mixed_precision", "no",
                   "--dynamo_backend", "no"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", port]
    command += [str(REPO_ROOT / "tests" / "distributed" / "distributed_stage.py"), str(settings_file)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-12000:]
    log = Path(settings["training"]["output_dir"]) / "logs.jsonl"
    return [entry["loss"] for entry in map(json.loads, log.read_text().splitlines()) if "loss" in entry]
