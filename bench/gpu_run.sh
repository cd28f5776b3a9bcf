#!/usr/bin/env bash
# The prepared GPU run: bench/fullsize.py at 1024² with the presets' real denoising steps, then bench/gpu.py,
# each writing its JSON (and its log) into $OUT (default: ./bench-out). Made for one H100/H200 with torch +
# CUDA already installed and no network; about 7 minutes, machine start aside.
#
#   bash bench/gpu_run.sh                  # in an environment with the project installed (pip install -e .)
#   OUT=/somewhere bash bench/gpu_run.sh
#
# Without the project's dependencies installed, put their wheels (everything in pyproject.toml but torch)
# into ./.whl first: they are installed from there, offline, into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the wheels in .whl failed" >&2; exit 2; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && python=.venv/bin/python
"$python" - <<'PY' || exit 2
import torch
assert torch.cuda.is_available(), "no CUDA device: bench/gpu_run.sh is for a GPU machine"
print("gpu:", torch.cuda.get_device_name(0), "torch", torch.__version__)
PY
status=0
# Training steps stay few (20; the real 800 would take minutes on their own): what is proven is that every
# stage runs at full size and resolution, and how long each takes.
timeout 270 "$python" bench/fullsize.py --device cuda --resolution 1024 --steps 30 --train-steps 20 \
    --class-images 1 --out "$out/fullsize.json" 2>"$out/fullsize.log" || status=1
timeout 240 "$python" bench/gpu.py --repeats 3 --out "$out/gpu.json" 2>"$out/gpu.log" || status=1
tail -n 3 "$out/fullsize.log" "$out/gpu.log"
exit $status
