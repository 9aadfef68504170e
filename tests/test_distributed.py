"""The same training script under `accelerate launch` with two CPU processes (DDP over gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_two_process_ddp_on_cpu_shards_the_data(tmp_path, tiny_llama):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": f"question {i}"},
                                              {"role": "assistant", "content": f"answer {i}"}]} for i in range(8)]))
    output = tmp_path / "ddp"
    # accelerate's --cpu flag always starts a single process; --multi_gpu on a machine without GPUs
    # starts the processes on the CPU, and the Trainer joins them with the gloo backend.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "train_chatgpt_model.py"), "--data", str(data), "--model", str(tiny_llama),
               "--output", str(output), "--epochs", "2", "--batch-size", "2", "--rehearsal", "0"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((output / "chatkit.json").read_text())["metrics"]
    assert metrics["steps"] == 4  # 8 conversations, 2 per process per step, 2 processes, 2 epochs
    assert result.stderr.count("Model saved in") == 1  # only the main process saves and reports
    assert (output / "adapter_model.safetensors").is_file()
