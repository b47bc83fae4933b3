#!/usr/bin/env bash
# GPU smoke test: the CUDA paths CI (CPU only) never runs. Trains a tiny class model on a generated
# folder in bf16 (fused AdamW), stops and resumes it, trains fp16 (GradScaler), samples on the GPU,
# reproduces a sample from its PNG byte for byte, and shows the model file. Run from the repository
# root on a machine with an NVIDIA GPU and torch, typer, rich, pillow, safetensors importable:
#     bash benchmarks/gpu_smoke.sh [WORK_DIR]
# Exits non-zero at the first failure.
set -euo pipefail
work=${1:-$(mktemp -d)}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
dc() { python3 -m diffcli "$@"; }

python3 - "$work/data" <<'PY'
import sys, random
from pathlib import Path
from PIL import Image
root = Path(sys.argv[1])
rng = random.Random(0)
for name, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
    (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(64):
        im = Image.new("RGB", (16, 16), tuple(max(0, min(255, c + rng.randint(-30, 30))) for c in colour))
        im.save(root / name / f"{i:03d}.png")
PY
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

tiny=(--model DiT-T/4 --resolution 16 --batch-size 64 --lr 1e-3 --checkpoint-every 50 --sample-every 50
      --metrics-every 10 --device cuda)
echo "== bf16, 50 steps, then resume to 100"
dc train "$work/data" --out "$work/bf16" "${tiny[@]}" --steps 50 --precision bf16 --log-every 0 2>&1 | tail -n 4
dc train "$work/data" --out "$work/bf16" "${tiny[@]}" --steps 100 --precision bf16 --json
grep -c '"step"' "$work/bf16/metrics.jsonl"
echo "== fp16 with a grad scaler, 30 steps"
dc train "$work/data" --out "$work/fp16" "${tiny[@]}" --steps 30 --precision fp16 --json

echo "== sample on the GPU, then --from-png"
dc sample -c "$work/bf16/model.safetensors" -n 8 --seed 3 --device cuda -o "$work/s" --json
dc sample -c "$work/bf16/model.safetensors" --device cuda --from-png "$work/s/5-0002.png" -o "$work/again" -q
cmp "$work/s/5-0002.png" "$work/again/5-0000.png" && echo "from-png on cuda: byte-identical"
dc info "$work/bf16/model.safetensors"
dc info "$work/bf16/checkpoints/step_0000100.safetensors" --json
if [ -n "${OUT:-}" ]; then cp "$work/bf16/samples/step_0000100.png" "$OUT/gpu-preview.png"; fi
echo "GPU SMOKE OK"
