#!/bin/sh
# try.sh OUT — one device call for development runs: optional GPU test programs, then
# bench_train runs, binaries packed in .lead-pack/ (../shared/device/pack).
#   TESTS="test_ops test_model" (default both; "" for none)
#   RUNS="SIZE:PREC[:ENV=VALUE[,ENV=VALUE]] ..." bench_train runs, each with its own environment
#   STEPS, WARM: bench_train's timed and warm-up steps.  HF="4b:bf16 ..." runs
#   bench/hf_baseline.py on those shapes after (same call).
out=${1:-.}
B=.lead-pack/bin
export LD_LIBRARY_PATH=$PWD/.lead-pack/lib:$LD_LIBRARY_PATH LATHE_SRCDIR=$PWD PYTHONUNBUFFERED=1
export LATHE_TINY_DIR=$PWD/models/tiny
STEPS=${STEPS:-6}
WARM=${WARM:-2}
t=$(date +%s)
for p in ${TESTS-test_ops test_model}; do
    timeout 150 $B/$p > "$out/$p.log" 2>&1; echo "$p rc=$? $(($(date +%s)-t))s"
    grep -H -E '^not ok|^1\.\.' "$out/$p.log"
done
for a in $RUNS; do
    s=${a%%:*}; rest=${a#*:}; p=${rest%%:*}; e=""
    [ "$rest" != "$p" ] && e=$(echo "${rest#*:}" | tr ',' ' ')
    echo "## $s $p $e" >> "$out/bench_lathe.log"
    env $e timeout 150 $B/bench_train $s $p 2048 2 $STEPS $WARM >> "$out/bench_lathe.log" 2>&1
    echo "bench $a rc=$? $(($(date +%s)-t))s"
done
[ -n "$RUNS" ] && grep -h -E '^##|^\{|^# memory' "$out/bench_lathe.log"
if [ -n "$HF" ]; then
    timeout ${HF_TIMEOUT:-200} python3 -c "
import sys; sys.path.insert(0, 'bench')
import hf_baseline as h, torch, transformers
print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(), flush=True)
for a in sys.argv[1:]:
    s, d = a.split(':')
    h.run(s, torch.bfloat16 if d == 'bf16' else torch.float16, 2048, 2, True)
" $HF 2>&1 | grep -v -i warn | tee "$out/bench_hf.log" | grep '^{'
fi
echo "total $(($(date +%s)-t))s"
