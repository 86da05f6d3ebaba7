#!/bin/sh
# run-bench.sh — every GPU check and benchmark, for the GPU machine, in one command:
#   checks  make check-gpu's two programs (TAP logs): every op against the CPU reference
#           (16-bit, fused-attention and fallback paths, NF4/int8 weights; the attention also
#           with a T4's and a 99 KiB device's tiles, LATHE_CUDA_SMEM_OPTIN), the whole model,
#           training and QLoRA against the CPU and the transformers / PEFT fixtures, and one
#           GRPO step against torch + peft (tests/fixtures/make_grpo_fixture.py, made here
#           when the fixture is not committed yet; copied to OUTDIR/grpo_fixture);
#   train   lathe's LoRA training on random:gemma-3-1b / 4b in bf16 and fp16 (bench_train) and
#           transformers + PEFT on the same shapes (bench/hf_baseline.py; checkpointing on);
#   qlora   QLoRA (NF4 + double quant, LoRA r=16 on all 7 linears, batch 1 x 2048): 4B, 12B
#           and 27B peak memory, 12B on the fp16 path under a 15 GiB cap (a T4's usable
#           memory, LATHE_CUDA_MEMORY_CAP), and tokens/s against lathe's own 16-bit LoRA at
#           the same shape (bitsandbytes is not on the machine), and the host memory a
#           quantized load takes (streamed; the old whole-model way once for 12b);
#   grpo    GRPO's sampling for 1B (bf16 and fp16; 8 and 64 completions at once, 256 new tokens,
#           hf_generate.py's top_k 64 / top_p 0.95 and GRPO's untruncated sampling) and
#           transformers' generate on the same shapes (bench/hf_generate.py), then a whole GRPO step (1B, group 8,
#           256 new tokens) with its time split; grpo-short: bf16 only;
#   flow    the notebook flow on the GPU (bench/gpu_flow.lathe through `lathe run`: load, LoRA,
#           train, generate, save adapter, save merged, GGUF q8_0 and f16) read back by
#           transformers + PEFT (bench/check_flow.py); the GGUF files come back in OUTDIR/flow
#           for llama.cpp here (bench/check_flow_gguf.py OUTDIR/flow);
#   decode  the decode step's fused launches (the linears of one input in one GEMV launch;
#           rmsnorm_add; qk_norm_rope) against the separate ones, in one binary (bench_rollout,
#           1B bf16 at 8 and 64 rows; LATHE_CUDA_GEMV_GROUP=0 / LATHE_CUDA_NORM_ADD=0);
#   bnb     the checkpoints `%save quantized=` writes (nf4, nf4 with bf16 parts, int8, dynamic)
#           loaded by transformers with bitsandbytes against lathe's logits
#           (bench/check_bnb_load.py); BNB_SRC names a folder holding bitsandbytes' Python
#           package (a source checkout: the machine has no bitsandbytes, and its pure-torch
#           backend runs it on the CPU without the native library);
#   full    full fine-tuning (bench_train RANK 0): what fits 15 GiB, and 1B in bf16;
#   lease   checks (no fallback rerun), the vision and pan-and-scan fixtures, grpo-short, flow,
#           full: under 9 minutes;
#   quick   for a short lease: the checks, then lathe vs transformers + PEFT on 4b bf16, QLoRA
#           4b against lathe's 16-bit LoRA at batch 1 x 2048, 12b QLoRA, then 1b bf16;
#   all     checks, train and qlora (the default).
# Usage there: sh bench/run-bench.sh OUTDIR [checks|train|qlora|grpo|grpo-short|decode|flow|bnb|lease|quick|all], with the binaries packed
# in .device-pack/ (.device-pack/bin/{test_ops,test_model,test_grpo_parity,bench_train,bench_rollout} and the shared
# libraries the GPU machine lacks in .device-pack/lib; PACK=DIR for another folder).
# Every run leaves OUTDIR/device.txt and OUTDIR/results.tgz (all the logs and files it wrote).
# HF_DTYPES="bf16" runs transformers + PEFT in bf16 only (default "bf16 fp16").
out=${1:-.}
what=${2:-all}
P=${PACK:-.device-pack}
B=$P/bin
# LATHE_TINY_DIR: the packed binaries look for the embedded tiny model beside their build tree
export LD_LIBRARY_PATH=$PWD/$P/lib:$LD_LIBRARY_PATH LATHE_SRCDIR=$PWD PYTHONUNBUFFERED=1 \
    LATHE_TINY_DIR=$PWD/models/tiny
# the references run on the machine's own libraries, not the packed ones
PY="env LD_LIBRARY_PATH=${LD_LIBRARY_PATH#$PWD/$P/lib:} python3"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/device.txt"
case $what in all|checks)
    if ! $B/test_ops > "$out/test_ops.log" 2>&1; then
        echo "test_ops failed: rerunning with LATHE_CUDA_SOFTMAX_GENERIC=1" | tee -a "$out/test_ops.log"
        LATHE_CUDA_SOFTMAX_GENERIC=1 $B/test_ops > "$out/test_ops_generic.log" 2>&1
    fi
    # the 16-bit attention runs the fused kernels by default; keep the cuBLAS-chunk fallback covered
    [ -z "$SHORT" ] && LATHE_CUDA_FLASH=0 $B/test_ops > "$out/test_ops_noflash.log" 2>&1
    # the fused attention's tiles for a T4 (64 KiB a block) and for sm_86 / sm_89 (99 KiB), on
    # this larger card (flash_plan.h; test_flash_plan lists which each architecture takes)
    LATHE_CUDA_SMEM_OPTIN=65536 $B/test_ops > "$out/test_ops_t4tiles.log" 2>&1
    LATHE_CUDA_SMEM_OPTIN=101376 $B/test_ops > "$out/test_ops_99k.log" 2>&1
    $B/test_model > "$out/test_model.log" 2>&1
    [ -x $B/test_vision_gpu ] && $B/test_vision_gpu > "$out/test_vision_gpu.log" 2>&1
    # GRPO's reference made here (torch + peft), then lathe's step against it on the CPU and CUDA
    if [ ! -f tests/fixtures/grpo/reference.json ] &&
        timeout 300 $PY tests/fixtures/make_grpo_fixture.py > "$out/grpo_fixture.log" 2>&1; then
        cp -r tests/fixtures/grpo "$out/grpo_fixture"
    fi
    $B/test_grpo_parity > "$out/test_grpo_parity.log" 2>&1
    grep -h -E '^not ok|^1\.\.' "$out"/test_*.log
esac
case $what in all|train)
    for a in "1b bf16" "1b fp16" "4b bf16" "4b fp16"; do
        timeout 150 $B/bench_train $a 2048 2 8 3 >> "$out/bench_lathe.log" 2>&1
    done
    timeout 300 $PY -c "
import sys; sys.path.insert(0, 'bench')
import hf_baseline as h, torch, transformers
print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(), flush=True)
dts = {'bf16': torch.bfloat16, 'fp16': torch.float16}
for s in ('1b', '4b'):
    for d in '${HF_DTYPES:-bf16 fp16}'.split():
        h.run(s, dts[d], 2048, 2, True)
" 2>&1 | grep -v -i warn >> "$out/bench_hf.log"
    grep -h '^{' "$out/bench_lathe.log" "$out/bench_hf.log"
esac
case $what in all|qlora)
    # SIZE PRECISION SEQ BATCH STEPS WARM QUANT RANK
    for a in "4b bf16 2048 1 6 2 none 16" "4b bf16 2048 1 6 2 nf4 16" "4b fp16 2048 1 6 2 nf4 16" \
             "12b bf16 2048 1 4 2 none 16" "12b bf16 2048 1 4 2 nf4 16" "27b bf16 2048 1 3 1 nf4 16"; do
        timeout 240 $B/bench_train $a >> "$out/bench_qlora.log" 2>&1
    done
    LATHE_CUDA_MEMORY_CAP=15G timeout 240 $B/bench_train 12b fp16 2048 1 4 2 nf4 16 \
        >> "$out/bench_qlora.log" 2>&1
    # host memory of a quantized load (VmHWM; the JSON's load_host_peak_gib): the old way (the
    # whole NF4 model in host memory, then copied) once for 12b to compare, and random:27b nf4
    # through the session as %load device=cuda loads it (the peak of the process, ru_maxrss)
    LATHE_BENCH_HOST_LOAD=1 timeout 240 $B/bench_train 12b bf16 2048 1 1 1 nf4 16 \
        >> "$out/bench_qlora.log" 2>&1
    $PY -c 'import resource, subprocess, sys
r = subprocess.run(sys.argv[1:]).returncode
print("lathe logits random:gemma-3-27b quant=nf4 device=cuda: exit %d, host peak %.2f GiB"
      % (r, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1048576.0))' \
        env LD_LIBRARY_PATH="$LD_LIBRARY_PATH" timeout 300 $B/lathe logits random:gemma-3-27b \
        quant=nf4 device=cuda --ids 2,651,1203,77 --out "$out/logits_27b_nf4.npy" \
        >> "$out/bench_qlora.log" 2>&1
    grep -h -E '^\{|^bench_train|drawn and placed|memory cap|host peak' "$out/bench_qlora.log"
esac
case $what in grpo|grpo-short)
    R=$B/bench_rollout
    runs='"1b bf16 1 8 256" "1b bf16 8 8 256" "1b bf16 1 8 256 128 0 1" "1b bf16 8 8 256 128 0 1"'
    [ "$what" = grpo ] && runs="$runs \"1b fp16 1 8 256\" \"1b fp16 8 8 256\""
    eval "set -- $runs"
    for a in "$@"; do
        timeout 120 $R sample $a >> "$out/bench_grpo.log" 2>&1
    done
    timeout 150 $R step 1b bf16 8 256 >> "$out/bench_grpo.log" 2>&1
    [ "$what" = grpo ] && timeout 100 $R step 1b fp16 8 256 >> "$out/bench_grpo.log" 2>&1
    timeout 200 $PY -c "
import sys; sys.path.insert(0, 'bench')
import hf_generate as g
g.run('1b', 8, 256); g.run('1b', 64, 256)
" 2>&1 | grep -v -i warn >> "$out/bench_grpo.log"
    grep -h -E '^\{|^bench_rollout' "$out/bench_grpo.log"
esac
case $what in decode)
    # the decode step's fused launches against the separate ones, same binary, alternating:
    # LATHE_CUDA_GEMV_GROUP=0 (the linears of one input one by one) and LATHE_CUDA_NORM_ADD=0
    # (rmsnorm_add and qk_norm_rope as the separate ops); 8 rows (top_k 64 / top_p 0.95 and
    # untruncated) twice, 64 rows once; each run ends with its op-by-op profile
    R=$B/bench_rollout
    for i in 1 2; do
        for v in "0 0" "1 0" "1 1"; do
            set -- $v
            for a in "1b bf16 1 8 256" "1b bf16 1 8 256 128 0 1"; do
                echo "== LATHE_CUDA_GEMV_GROUP=$1 LATHE_CUDA_NORM_ADD=$2 run $i: $a" >> "$out/bench_decode.log"
                LATHE_CUDA_GEMV_GROUP=$1 LATHE_CUDA_NORM_ADD=$2 timeout 40 $R sample $a \
                    >> "$out/bench_decode.log" 2>&1
            done
        done
    done
    for v in "0 0" "1 1"; do
        set -- $v
        echo "== LATHE_CUDA_GEMV_GROUP=$1 LATHE_CUDA_NORM_ADD=$2: 1b bf16 8 8 256" >> "$out/bench_decode.log"
        LATHE_CUDA_GEMV_GROUP=$1 LATHE_CUDA_NORM_ADD=$2 timeout 40 $R sample 1b bf16 8 8 256 \
            >> "$out/bench_decode.log" 2>&1
    done
    grep -h -E '^==|^\{|^bench_rollout' "$out/bench_decode.log"
esac
case $what in flow)
    # the notebook flow on the GPU (bench/gpu_flow.lathe), read back by transformers + PEFT
    mkdir -p "$out/flow"
    sed -e "s|@DEVICE@|cuda|g" -e "s|@OUT@|$out/flow|g" bench/gpu_flow.lathe > "$out/flow.lathe"
    timeout 300 $B/lathe run "$out/flow.lathe" > "$out/flow.log" 2>&1
    echo "lathe run: exit $?" >> "$out/flow.log"
    timeout 60 $B/lathe logits "$out/flow/merged" device=cuda dtype=fp32 \
        --ids 2,651,1203,77,3001,18,940,12,33,1500,2047,812 --out "$out/flow/lathe_logits.npy" \
        >> "$out/flow.log" 2>&1
    timeout 240 $PY bench/check_flow.py "$out/flow" >> "$out/flow.log" 2>&1
    grep -h -E 'exit|Error|error|checks|^\{' "$out/flow.log"
esac
case $what in bnb)
    LATHE=$B/lathe $PY bench/check_bnb_load.py make "$out/bnb" > "$out/bnb_load.log" 2>&1 &&
        CUDA_VISIBLE_DEVICES= PYTHONPATH=${BNB_SRC:?BNB_SRC: a folder with bitsandbytes/} \
        timeout 200 $PY bench/check_bnb_load.py check "$out/bnb" >> "$out/bnb_load.log" 2>&1
    echo "check_bnb_load: exit $?" >> "$out/bnb_load.log"
    grep -h -E '^\{|exit' "$out/bnb_load.log"
esac
case $what in full)
    # full fine-tuning (%lora full=true: fp32 master weights, gradients and AdamW moments on the
    # GPU): what fits a T4's 15 GiB (LATHE_CUDA_MEMORY_CAP) and what it takes on the card
    for a in "270m fp16 1024 1 3 1 none 0" "1b fp16 1024 1 3 1 none 0"; do
        LATHE_CUDA_MEMORY_CAP=15G timeout 60 $B/bench_train $a >> "$out/bench_full.log" 2>&1
    done
    timeout 60 $B/bench_train 1b bf16 1024 1 3 1 none 0 >> "$out/bench_full.log" 2>&1
    grep -h -E '^\{|^bench_train|memory cap|^# memory' "$out/bench_full.log"
esac
case $what in lease)
    # everything new since the last lease, in one call under 8 minutes, most needed first: the
    # checks (without the no-flash rerun), the vision fixture when its script is here, GRPO's
    # bf16 runs, the flow
    SHORT=1 timeout 230 env NESTED=1 sh "$0" "$out" checks
    if [ -f tests/fixtures/make_vision_fixture.py ]; then
        mkdir -p "$out/vision"
        timeout 60 $PY tests/fixtures/make_vision_fixture.py --out "$out/vision" \
            > "$out/vision_fixture.log" 2>&1
        echo "vision fixture: exit $?" >> "$out/vision_fixture.log"
        grep -E 'diag|FAILED|exit|transformers' "$out/vision_fixture.log" | tail -12
    fi
    # transformers' pan-and-scan golden (Gemma3ImageProcessor, Gemma3Processor's crop text),
    # made here while it is not committed; test_pan_scan_golden reads tests/fixtures/pan_scan
    if [ ! -f tests/fixtures/pan_scan/reference.json ]; then
        timeout 60 $PY tests/fixtures/make_pan_scan_fixture.py --out "$out/pan_scan" \
            > "$out/pan_scan_fixture.log" 2>&1
        echo "pan-and-scan fixture: exit $?" | tee -a "$out/pan_scan_fixture.log"
    fi
    timeout 150 env NESTED=1 sh "$0" "$out" grpo-short
    timeout 90 env NESTED=1 sh "$0" "$out" flow
    timeout 100 env NESTED=1 sh "$0" "$out" full
esac
case $what in quick)
    timeout 150 env NESTED=1 sh "$0" "$out" checks
    timeout 75 $B/bench_train 4b bf16 2048 2 6 2 >> "$out/bench_lathe.log" 2>&1
    timeout 120 $PY -c "
import sys; sys.path.insert(0, 'bench')
import hf_baseline as h, torch
h.run('4b', torch.bfloat16, 2048, 2, True)
" 2>&1 | grep -v -i warn >> "$out/bench_hf.log"
    for a in "4b bf16 2048 1 6 2 none 16" "4b bf16 2048 1 6 2 nf4 16" "12b bf16 2048 1 3 1 nf4 16"; do
        timeout 90 $B/bench_train $a >> "$out/bench_qlora.log" 2>&1
    done
    timeout 60 $B/bench_train 1b bf16 2048 2 6 2 >> "$out/bench_lathe.log" 2>&1
    grep -h -E '^\{|^bench_train|drawn and placed' "$out"/bench_*.log
esac
cat "$out/device.txt"
# The device hands back only a few files: everything but device.txt travels as one archive,
# OUTDIR/results.tgz (logs, fixtures, the flow's checkpoints); `tar -xzf` it here.
if [ -z "$NESTED" ]; then
    (cd "$out" && ls -A | grep -v -x -e device.txt -e results.tgz -e .list > .list &&
        tar -czf results.tgz -T .list && xargs rm -rf < .list && rm -f .list)
fi
