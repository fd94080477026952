#!/usr/bin/env bash
# The GPU figures that ../shared/device/gpu_check.sh does not take, as one prepared call:
# start-up to the first batch (goal <= 4 s), the pipeline's ceiling without the model, TokenCut
# and DINO-seg batched vs their references (goal: TokenCut >= 20x), the protocol grid vs one
# run with ViT-L/14 (goal <= 3x), and bench_extraction for ViT-L/14 bf16 and fp32 (goal >=
# 0.9). On a lent GPU, after `bash ../shared/device/prepare.sh` here, the device tool's run
# with carry [".device"] and, e.g.,
#     STEPS="voc07 lost" bash .device/gpu_check.sh; bash benchmarks/gpu_more.sh
# Output goes to $OUT/more.txt (or ./gpu_more.txt). Each step has its own time limit (about
# 8 minutes if every step used all of it: 90+75+75+90+2x75 s; the sizes are set from the
# H200 rates of ../shared/device/README.md and estimates, not from a run of this script there).
# MORE="startup methods" picks steps. A CPU dry run of every command line on tiny inputs:
#     DEVICE=cpu QUICK=1 bash benchmarks/gpu_more.sh
set -u
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
MORE=${MORE:-"startup pipeline methods protocol extraction"}
LOG=gpu_more.txt
[ -n "${OUT:-}" ] && LOG=$OUT/more.txt
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MPLBACKEND=Agg
if [ -d /tmp/site ]; then export PYTHONPATH=/tmp/site:$PWD  # gpu_check.sh installed the wheels
elif [ -d .device/whl ] && ! python3 -c 'import timm' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl &&
    export PYTHONPATH=/tmp/site:$PWD
fi
PY=${PYTHON:-python3}
if [ "${QUICK:-0}" = 1 ]; then  # tiny sizes: checks the command lines, measures nothing
  N_START=4 N_PIPE=8 N_METH=4 N_PROT=2 N_EXT=4 SCALE=0.2 BS=4 W=0,1 NW=0 R=1
else
  N_START=500 N_PIPE=500 N_METH=64 N_PROT=200 N_EXT=512 SCALE=1 BS=64 W=0,8,16 NW=8 R=2
fi
has() { [[ " $MORE " == *" $1 "* ]]; }
step() { local limit=$1; shift; printf '\n===== %s\n' "$*" >>"$LOG"; local a; a=$(date +%s)
         timeout "$limit" "$@" >>"$LOG" 2>&1
         printf -- '----- rc=%s wall=%ss\n' "$?" "$(( $(date +%s) - a ))" >>"$LOG"; }

has startup && step 90 $PY benchmarks/bench_startup.py --device "$DEVICE" --images $N_START \
  --size-scale $SCALE --precision bf16 --batch-size $BS --repeats $R
has pipeline && step 75 $PY benchmarks/bench_pipeline.py --device "$DEVICE" --images $N_PIPE \
  --size-scale $SCALE --batch-size $BS --workers $W --repeats $R
has methods && step 75 $PY benchmarks/bench_methods.py --device "$DEVICE" --images $N_METH \
  --size-scale $SCALE --batch-size $BS --rounds $R --profile
has protocol && step 90 $PY benchmarks/bench_protocol.py --device "$DEVICE" \
  --model dinov2_vitl14_reg4 --images $N_PROT --size-scale $SCALE --batch-size $BS \
  --num-workers $NW --repeats 1 --profile
if has extraction; then
  for precision in bf16 fp32; do
    step 75 $PY benchmarks/bench_extraction.py --device "$DEVICE" --model dinov2_vitl14_reg4 \
      --precision $precision --images $N_EXT --size-scale $SCALE --batch-size $BS \
      --num-workers $NW --repeats $R
  done
fi
echo "wrote $LOG"
