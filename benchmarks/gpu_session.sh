#!/usr/bin/env bash
# The GPU checks and figures of the fused attention work, in commands that each aim to fit a 10-minute slot.
#
# On a machine with pip access, fetch the wheels a bare GPU image may lack (the audio libraries the package imports):
#     bash benchmarks/gpu_session.sh wheels
# Then on the GPU machine, from the repository root (results and logs go to $OUT, else benchmarks/results):
#     bash benchmarks/gpu_session.sh tests       # fp32/bf16 outputs and gradients of flex and triton vs eager
#     bash benchmarks/gpu_session.sh attention   # benchmarks/attention.py, bf16, fwd and fwd+bwd, 4B heads
#     bash benchmarks/gpu_session.sh attention-small   # the same with the tiny and base heads
#     bash benchmarks/gpu_session.sh model       # benchmarks/model.py, 4B: images/s and one pretraining step's MFU
#     bash benchmarks/gpu_session.sh triton-tune # benchmarks/triton_configs.py: each Triton launch config, timed
#     bash benchmarks/gpu_session.sh step-compiled  # the 4B pretraining step with compiled fusion layers: MFU
# The package itself is used from src/ (no install), with whatever torch/transformers the machine has.
set -euo pipefail
cd "$(dirname "$0")/.."
step=${1:?usage: gpu_session.sh wheels|tests|attention|attention-small|model|triton-tune|step-compiled}

if [ "$step" = wheels ]; then
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl soundfile soxr cffi pycparser
fi

out=${OUT:-benchmarks/results}
mkdir -p "$out"
site=/tmp/onepeace_site
if ! python3 -c "import soundfile, soxr" 2>/dev/null && [ ! -d "$site" ]; then
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "soundfile/soxr are missing: run 'bash benchmarks/gpu_session.sh wheels' where pip works, bring .whl/" >&2
        exit 1
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
fi
export PYTHONPATH="src:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__,
            torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")'

case "$step" in
tests)
    python3 -m pytest tests/test_flex_attention.py tests/test_triton_attention.py -q -rs --durations=5 \
        -p no:cacheprovider 2>&1 | tee "$out/tests.log"
    ;;
attention)  # the 4B heads, the targets' shape (each new shape compiles FlexAttention once: ~10 compilations)
    python3 benchmarks/attention.py --device cuda --dtype bfloat16 --backward --sizes 4b \
        --json "$out/attention_cuda_bf16.json" 2>&1 | tee "$out/attention.log"
    python3 benchmarks/attention.py --device cuda --dtype bfloat16 --backward --padded --sizes 4b \
        --json "$out/attention_cuda_bf16_padded.json" 2>&1 | tee -a "$out/attention.log"
    ;;
attention-small)  # the tiny and base heads
    python3 benchmarks/attention.py --device cuda --dtype bfloat16 --backward --sizes tiny base \
        --json "$out/attention_cuda_bf16_small.json" 2>&1 | tee "$out/attention_small.log"
    ;;
model)
    common=(--size 4b --device cuda --dtype bfloat16 --param-dtype bfloat16 --modalities image
            --batch-size 64 --train-batch-size 16 --iters 3)
    python3 benchmarks/model.py "${common[@]}" --json "$out/model_4b.json" 2>&1 | tee "$out/model.log"
    python3 benchmarks/model.py "${common[@]}" --parts embed --fuse-projections --compile \
        --json "$out/model_4b_fused_compiled.json" 2>&1 | tee -a "$out/model.log"
    ;;
triton-tune)  # bf16, 4B heads, L = 257 and 751: every candidate tile config against the one in use
    python3 benchmarks/triton_configs.py time --dtype bfloat16 --lengths 257 751 \
        --json "$out/triton_configs_bf16.json" 2>&1 | tee "$out/triton_configs.log"
    python3 benchmarks/triton_configs.py time --dtype bfloat16 --lengths 751 --padded \
        --json "$out/triton_configs_bf16_padded.json" 2>&1 | tee -a "$out/triton_configs.log"
    ;;
step-compiled)  # regional compilation as the trainer does it; two attention kernels, to keep compiling short
    python3 benchmarks/model.py --size 4b --device cuda --dtype bfloat16 --param-dtype bfloat16 --parts step \
        --train-batch-size 16 --iters 3 --attn sdpa onepeace_triton --fuse-projections --compile \
        --json "$out/model_4b_step_compiled.json" 2>&1 | tee "$out/model_step_compiled.log"
    ;;
*)
    echo "unknown step: $step (wheels, tests, attention, attention-small, model, triton-tune or step-compiled)" >&2
    exit 2
    ;;
esac
