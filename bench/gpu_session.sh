#!/usr/bin/env bash
# The checks to run when a session is lent a GPU (the `device` tool), in one call from the repository root:
# the CUDA tests, the int4 matrix-vector kernel's tile sizes measured for this card (the table comes back in $OUT),
# Qwen-7B-Chat shapes dense and Int4 at batch 1 and 64 streams, and a profile of one decode step.
# Packages the GPU image lacks travel as wheels in .whl/ (see README "GPU"). Logs go to $OUT (or /tmp/gpu-session).
# Usage: bash bench/gpu_session.sh [tests] [tune] [bench] [kernels] [profile]   (no argument: all but kernels)
set -u
out=${OUT:-/tmp/gpu-session}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
parts=${*:-tests tune bench profile}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'capability', torch.cuda.get_device_capability())" | tee -a "$out/gpu.txt"

if [[ $parts == *tests* ]]; then
    timeout 240 python3 -m pytest -p no:cacheprovider -q --timeout 120 tests/unit/engine/test_paged_decode.py \
        tests/unit/engine/test_triton_int4.py tests/unit/engine/test_triton_rope.py tests/unit/engine/test_triton_norm.py \
        tests/unit/engine/test_cuda.py 2>&1 | tee "$out/tests.log"
    timeout 120 python3 -m pytest -p no:cacheprovider -m cuda -q --timeout 60 tests/unit/engine/test_sampling.py 2>&1 \
        | tee -a "$out/tests.log"
fi
if [[ $parts == *tune* ]]; then
    timeout 300 python3 bench/int4_gemv_tune.py 2>&1 | tee "$out/tune.log"
    cp engine/kernels/int4_gemv_tuned.json "$out/"
fi
if [[ $parts == *bench* ]]; then
    for weights in "dense" "dense --kv-cache-dtype fp8" "int4 --int4-kernel triton" "int4 --int4-kernel tinygemm" \
        "int4 --int4-kernel tinygemm --act-order"; do
        # shellcheck disable=SC2086  # the options are meant to split
        timeout 180 python3 bench/engine_speed.py --device cuda --shape qwen-7b --weights $weights 2>&1 \
            | tee -a "$out/bench.log"
    done
fi
if [[ $parts == *kernels* ]]; then
    timeout 120 python3 bench/int4_kernels.py 2>&1 | tee "$out/int4-kernels.log"
fi
if [[ $parts == *profile* ]]; then
    for kernel in tinygemm triton; do
        timeout 90 python3 bench/step_profile.py --device cuda --layers 4 --batch 1 --weights int4 \
            --int4-kernel "$kernel" 2>&1 | tee "$out/profile-$kernel.log"
    done
fi
