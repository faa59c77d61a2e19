#!/usr/bin/env bash
# Issue #22, item 4 on a lent GPU machine: the trainer's step fed from JPEG files (decoded on the GPU, and
# with PIL in loader processes) against the same step on a batch in memory (bench/gpu.py --input jpeg),
# for ResNet-50 and for the two detectors of bench/gpu-detection-*.json.
#
# Here, once, in the repository root (the device image lacks the trainer's pydantic and boto3; ~20 MB):
#     echo /.whl/ >> .git/info/exclude && bench/gpu_input_device.sh --wheels
# Then one device `run`, carry [".whl"], timeout_s 600 (on an H200 about 3 minutes for classification and
# an estimated 3-4 for the detectors; `classification` or `detection` as the argument runs that part only):
#     bench/gpu_input_device.sh
# It writes gpu-input.json/.log (classification) and gpu-input-<detector>.json/.log to $OUT; copy them to
# bench/gpu-input-<card>.json/.log and bench/gpu-input-<detector>-<card>.json/.log.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--wheels" ]; then
    # The versions of this repository's environment; Python 3.12 and x86-64 as on the device machine.
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
        typing_extensions==4.16.0 boto3==1.44.8 botocore==1.44.8 s3transfer==0.19.3 jmespath==1.1.0
    exit 0
fi

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
echo "cores: $(nproc)"
part="${1:-all}"
if [ "$part" = all ] || [ "$part" = classification ]; then
    # ResNet-50 bf16, batch 256 at 224 px, 2,048 JPEGs of 224-500 px, augment standard; loader workers 2, 4, 8, 16.
    python3 bench/gpu.py --input jpeg --warmup 5 --steps 30 --repeats 3 --json "$out/gpu-input.json" 2>&1 \
        | tee "$out/gpu-input.log"
fi
if [ "$part" = all ] || [ "$part" = detection ]; then
    # Batch 16 at 640 px, bf16, as bench/gpu-detection-*.json (~75 img/s in memory); 512 JPEGs of 480-640 px
    # with three boxes each, flipped (augment standard); loader workers 1, 2, 4. Fewer steps than
    # classification: a detector's step takes ~0.2 s, and 20 of them still span ~320 images.
    for model in fasterrcnn_resnet50_fpn_v2 retinanet_resnet50_fpn_v2; do
        python3 bench/gpu.py --task detection --model "$model" --input jpeg --warmup 5 --steps 20 --repeats 3 \
            --json "$out/gpu-input-$model.json" 2>&1 | tee "$out/gpu-input-$model.log"
    done
fi
