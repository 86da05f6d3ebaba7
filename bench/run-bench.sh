#!/bin/sh
# run-bench.sh — the GPU-machine half of the CUDA backend's checks and benchmark, in one command:
#   make check-gpu's two programs (TAP logs), lathe's LoRA training benchmark on
#   random:gemma-3-1b / 4b in bf16 and fp16 (bench_train), and transformers + PEFT on the same
#   shapes (bench/hf_baseline.py; checkpointing on).
# Usage there: sh bench/run-bench.sh OUTDIR, with the binaries packed in .device-pack/ (the
# programs in bin/, the shared libraries the GPU machine lacks in lib/):
# .device-pack/bin/{test_ops,test_model,bench_train} (PACK=DIR for another).
out=${1:-.}
P=${PACK:-.device-pack}
B=$P/bin
export LD_LIBRARY_PATH=$PWD/$P/lib:$LD_LIBRARY_PATH LATHE_SRCDIR=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/device.txt"
if ! $B/test_ops > "$out/test_ops.log" 2>&1; then
    echo "test_ops failed: rerunning with LATHE_CUDA_SOFTMAX_GENERIC=1" | tee -a "$out/test_ops.log"
    export LATHE_CUDA_SOFTMAX_GENERIC=1
    $B/test_ops > "$out/test_ops_generic.log" 2>&1
fi
# the 16-bit attention runs the fused kernels by default; keep the cuBLAS-chunk fallback covered too
LATHE_CUDA_FLASH=0 $B/test_ops > "$out/test_ops_noflash.log" 2>&1
$B/test_model > "$out/test_model.log" 2>&1
for a in "1b bf16" "1b fp16" "4b bf16" "4b fp16"; do
    timeout 150 $B/bench_train $a 2048 2 8 3 >> "$out/bench_lathe.log" 2>&1
done
timeout 300 python3 -c "
import sys; sys.path.insert(0, 'bench')
import hf_baseline as h, torch, transformers
print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(), flush=True)
for s in ('1b', '4b'):
    for d in (torch.bfloat16, torch.float16):
        h.run(s, d, 2048, 2, True)
" 2>&1 | grep -v -i warn >> "$out/bench_hf.log"
cat "$out/device.txt"
grep -h -E '^not ok|^1\.\.' "$out"/test_*.log
grep -h '^{' "$out/bench_lathe.log" "$out/bench_hf.log"
