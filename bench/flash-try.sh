#!/bin/sh
# flash-try.sh OUT — one device call for the fused-attention work: both GPU test programs, then
# bench_train with the fused kernels (default) and without them (LATHE_CUDA_FLASH=0), binaries
# packed in .h8pack/ (../shared/device/pack). RUNS="SIZE:PREC:FLASH ..."; HF runs
# bench/hf_baseline.py after (see below); MODEL_OFF=1 reruns test_model with LATHE_CUDA_FLASH=0.
out=${1:-.}
B=.h8pack/bin
export LD_LIBRARY_PATH=$PWD/.h8pack/lib:$LD_LIBRARY_PATH LATHE_SRCDIR=$PWD PYTHONUNBUFFERED=1
STEPS=${STEPS:-6}
WARM=${WARM:-2}
t=$(date +%s)
timeout 100 $B/test_ops > "$out/test_ops.log" 2>&1; echo "test_ops rc=$? $(($(date +%s)-t))s"
timeout 120 $B/test_model > "$out/test_model.log" 2>&1; echo "test_model rc=$? $(($(date +%s)-t))s"
if [ -n "$MODEL_OFF" ]; then
    LATHE_CUDA_FLASH=0 timeout 120 $B/test_model > "$out/test_model_noflash.log" 2>&1
    echo "test_model (LATHE_CUDA_FLASH=0) rc=$? $(($(date +%s)-t))s"
fi
grep -H -E '^not ok|^1\.\.' "$out"/test_*.log
for a in $RUNS; do
    s=${a%%:*}; rest=${a#*:}; p=${rest%%:*}; f=${rest#*:}
    echo "## $s $p flash=$f" >> "$out/bench_lathe.log"
    LATHE_CUDA_FLASH=$f timeout 120 $B/bench_train $s $p 2048 2 $STEPS $WARM >> "$out/bench_lathe.log" 2>&1
    echo "bench $a rc=$? $(($(date +%s)-t))s"
done
grep -h -E '^##|^\{|attention' "$out/bench_lathe.log"
if [ -n "$HF" ]; then  # HF="1b:bf16 4b:bf16 ..." (SIZE:DTYPE pairs), or HF=1 for all four
    [ "$HF" = 1 ] && HF="1b:bf16 1b:fp16 4b:bf16 4b:fp16"
    timeout ${HF_TIMEOUT:-200} python3 -c "
import sys; sys.path.insert(0, 'bench')
import hf_baseline as h, torch, transformers
print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(), flush=True)
for a in sys.argv[1:]:
    s, d = a.split(':')
    h.run(s, torch.bfloat16 if d == 'bf16' else torch.float16, 2048, 2, True)
" $HF 2>&1 | grep -v -i warn >> "$out/bench_hf.log"
    grep -h '^{' "$out/bench_hf.log"
fi
echo "total $(($(date +%s)-t))s"
