#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and PyTorch: what the coordinator sees (`gpu-coordinator gpus`), before and
# while a process holds 4 GiB of VRAM. Usage: scripts/gpu-check.sh [path to gpu-coordinator]
set -u
B=${1:-$PWD/target/release/gpu-coordinator}
nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv
echo "=== gpu-coordinator gpus (nothing allocated)"
$B gpus
python3 - "$B" <<'PY'
import os, subprocess, sys, torch
b = sys.argv[1]
x = torch.empty(4 * 1024**3, dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
print(f"=== a process (pid {os.getpid()}) now holds 4 GiB on cuda:0")
print(subprocess.run([b, "gpus"], capture_output=True, text=True).stdout)
print(subprocess.run([b, "gpus", "--json"], capture_output=True, text=True).stdout)
PY
