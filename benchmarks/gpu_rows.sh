#!/usr/bin/env bash
# Every GPU row in one command, on the device machine (or here with --tiny). See benchmarks/gpu_rows.py.
#
# The device machine has torch but not diffusers, datasets or kohya's pinned libraries. Here, first:
#     bash benchmarks/device_carry.sh        # wheels into .whl/, the two peers' code into .peers/ (both ignored)
# then one device call: carry [".whl", ".peers"], command:
#     bash benchmarks/gpu_rows.sh 2>&1 | tee $OUT/gpu_rows.log
# It installs .whl/main for ours and diffusers' script and .whl/kohya (kohya's pins: transformers 4.54 …) for
# kohya alone, points the benchmarks at .peers, and writes $OUT/gpu_rows.json.
# On a CPU: PYTHON=.venv/bin/python bash benchmarks/gpu_rows.sh --tiny --reference-script … --reference-pythonpath …
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
install_wheels() {  # folder of wheels → target folder (only for the Python they were fetched for: 3.12)
    if compgen -G "$1/*.whl" > /dev/null && "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$2" "$1"/*.whl
    fi
}
install_wheels .whl/main /tmp/selma-site
install_wheels .whl/kohya /tmp/kohya-site
# The repository root is the package comfyui_selma (pip installs it so); a link makes it importable without pip.
mkdir -p /tmp/selma-package && ln -sfn "$PWD" /tmp/selma-package/comfyui_selma
export PYTHONPATH=/tmp/selma-site:/tmp/selma-package${PYTHONPATH:+:$PYTHONPATH}
peers=()
if [ -f .peers/train_text_to_image_lora.py ]; then
    peers+=(--reference-script "$PWD/.peers/train_text_to_image_lora.py")
fi
if [ -f .peers/sd-scripts/train_network.py ]; then
    # kohya's process sees its pinned libraries first, then the machine's torch
    printf '#!/bin/sh\nPYTHONPATH=/tmp/kohya-site${PYTHONPATH:+:$PYTHONPATH} exec %s "$@"\n' "$(command -v "$PYTHON")" \
        > /tmp/kohya-python && chmod +x /tmp/kohya-python
    peers+=(--kohya-scripts "$PWD/.peers/sd-scripts" --kohya-python /tmp/kohya-python)
fi
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec "$PYTHON" benchmarks/gpu_rows.py "${peers[@]}" "$@"
