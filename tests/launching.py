"""Running scripts under `accelerate launch` from tests."""

import os
import socket
import subprocess
import sys
from pathlib import Path


def accelerate_launch(script, *args, processes=2, mixed_precision="no", dynamo_backend="no",
                      regional_compilation=False, extra_env=None):
    """`accelerate launch --multi_gpu` with CPU processes (plain `--cpu --num_processes 2` runs one process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *(["--multi_gpu"] if processes > 1 else []),
        "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", mixed_precision,
        "--dynamo_backend", dynamo_backend, *(["--dynamo_use_regional_compilation"] if regional_compilation else []),
        "--main_process_port", str(port), str(script), *map(str, args),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           **(extra_env or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(repo / "src"), env.get("PYTHONPATH", "")])
    return subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
