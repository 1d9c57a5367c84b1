#!/usr/bin/env bash
# Here, before a device session: what benchmarks/gpu_rows.sh needs that the device machine (Python 3.12,
# torch, transformers 5.17, accelerate, peft, pandas, pyarrow …; no diffusers) lacks, in two folders that
# .git/info/exclude ignores: .whl/ (wheels for its Python) and .peers/ (the peers' code, never committed).
#   bash benchmarks/device_carry.sh [DIFFUSERS_SCRIPT] [SD_SCRIPTS_CHECKOUT]
# defaults: /work/diffusers-examples/train_text_to_image_lora.py and /work/sd-scripts.
set -euo pipefail
cd "$(dirname "$0")/.."
script=${1:-/work/diffusers-examples/train_text_to_image_lora.py}
sd_scripts=${2:-/work/sd-scripts}
for folder in /.whl/ /.peers/; do
    grep -qxF "$folder" .git/info/exclude || echo "$folder" >> .git/info/exclude
done
rm -rf .whl .peers && mkdir -p .whl/main .whl/kohya .peers/sd-scripts
PIP=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
     --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# ours and diffusers' script (the versions requirements.lock holds); rouge-score ships no wheel: build one
"${PIP[@]}" -d .whl/main diffusers==0.42.1 importlib_metadata==10.2.0 datasets==5.2.0 dill==0.4.1 \
    multiprocess==0.70.19 tomli_w==1.2.0 rapidfuzz==3.14.6
python3 -m pip wheel -q --no-deps -w .whl/main rouge-score==0.1.2
# kohya's own pins (sd-scripts' requirements.txt): its code needs transformers 4.x
"${PIP[@]}" -d .whl/kohya transformers==4.54.1 diffusers==0.32.1 accelerate==1.6.0 huggingface-hub==0.34.3 \
    tokenizers==0.21.4 safetensors==0.4.5 toml==0.10.2 voluptuous==0.16.0 imagesize==2.0.1
cp "$script" .peers/train_text_to_image_lora.py
cp -r "$sd_scripts"/train_network.py "$sd_scripts"/library "$sd_scripts"/networks .peers/sd-scripts/
du -sh .whl .peers
