#!/usr/bin/env bash
# The GPU check: every CUDA path and performance target in one command, for a short GPU window.
#
#   bash bench/gpu_check.sh --prepare   here, with network and ffmpeg: .whl/ (the Python packages
#                                       a CUDA + PyTorch image lacks) and .gpu_check/ (the media
#                                       stages' outputs and the tokenize benchmark's clips);
#                                       both git-ignored, both carried to the GPU machine
#   bash bench/gpu_check.sh             on the GPU machine (no network, about 8 minutes on an H100)
#   bash bench/gpu_check.sh --dry       CPU, tiny sizes: every step's code path (CI runs it)
#   ... --out DIR                       where gpu_check.json, gpu_check.md and gpu_check.log go
#                                       (default: $OUT when set, else reports/gpu_check)
#
# Steps, in order, each under its own `timeout` (and all within GPU_CHECK_SECONDS, default 510),
# so that one failure or hang does not lose the rest: setup (pip install of .whl/ into a
# scratch folder on PYTHONPATH), env (machine line, GPU, versions), dag (the tiny profile's
# DAG with every stage on cuda: bench/gpu_check.py), train_bf16 and train_ckpt
# (bench/train_throughput.py), generate (bench/generate.py), im2wav (bench/im2wav_sampler.py),
# encoders and tokenize (bench/tokenize_throughput.py: the official-size encoders, then the
# Ray Data job against the plain loop). After each step the report is rewritten, so that a
# check cut short still leaves it. The exit status is 0 when every step ran (targets may still
# be missed: the report says which), 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."

mode=gpu
out=""
while [ $# -gt 0 ]; do
  case $1 in
    --dry) mode=dry ;;
    --prepare) mode=prepare ;;
    --out) out=${2:?--out needs a folder}; shift ;;
    -h | --help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
PYTHON=${PYTHON:-python3}
# The dry run uses the packages installed unless given a wheel folder: .whl/ holds the GPU
# image's Python 3.12 wheels, which another Python cannot install.
if [ "$mode" = dry ]; then WHEELS=${GPU_CHECK_WHEELS:-}; else WHEELS=${GPU_CHECK_WHEELS:-.whl}; fi
PREPARED=.gpu_check
# The tokenize benchmark's clips on the GPU: made here by --prepare (a GPU machine may have no
# ffmpeg), the same flags there; 8 x (4 + 1) clips and the 8 x (1 + 1) small set fit the carry.
TOKENIZE_SET=(--classes 8 --train 4 --test 1 --image-size 64)

if [ "$mode" = prepare ]; then
  set -e
  bash bench/gpu_wheels.sh "$WHEELS"
  rm -rf "$PREPARED"
  "$PYTHON" bench/gpu_check.py prepare --out "$PREPARED/dag"
  "$PYTHON" bench/tokenize_throughput.py --work "$PREPARED/tokenize" "${TOKENIZE_SET[@]}" \
    --prepare-only
  commit=$(git rev-parse HEAD)
  [ -z "$(git status --porcelain --untracked-files=no)" ] || commit="$commit+dirty"
  echo "$commit" > "$PREPARED/commit"
  # What a device call sends: tracked and untracked-not-ignored files, plus these two; at most
  # 64 MiB, of which 4 are kept for the tree to grow.
  tree=$(git ls-files -z --cached --others --exclude-standard \
    | du -cb --files0-from=- 2> /dev/null | tail -n 1 | cut -f1)
  carried=$(du -sb "$WHEELS" "$PREPARED" | awk '{ s += $1 } END { print s }')
  total=$(((tree + carried) / 1048576))
  echo "prepare: $WHEELS and $PREPARED ready; working tree + both = $total MiB (at most 60)"
  [ "$total" -le 60 ] || { echo "prepare: too large to send with the working tree" >&2; exit 1; }
  exit 0
fi

out=${out:-${OUT:-reports/gpu_check}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
log="$out/gpu_check.log"
: > "$log"
: > "$work/steps.tsv"
if [ "$mode" = dry ]; then
  # About 1.5 minutes on a quiet 2-core box, 3 on a busy one; the rest is room.
  budget=${GPU_CHECK_SECONDS:-420}
else
  budget=${GPU_CHECK_SECONDS:-510}
fi
deadline=$((SECONDS + budget))
failed=0

say() { echo "$*" | tee -a "$log"; }

report() {
  "$PYTHON" bench/gpu_check.py report --work "$work" --out "$out" --mode "$mode" >> "$log" 2>&1
}

# step NAME LIMIT_S COMMAND...: run COMMAND under its own timeout (LIMIT_S, less when the
# check's time runs short), its output to WORK/NAME.log and the log; record exit, time, limit.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((deadline - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    printf '%s\tskipped\t\t\t%s\n' "$name" "$*" >> "$work/steps.tsv"
    say "=== $name: skipped, the check's $budget s (GPU_CHECK_SECONDS) are used up"
    failed=1
    report
    return
  fi
  say "=== $name (limit ${limit} s): $*"
  local start rc
  start=$(date +%s.%N)
  timeout --kill-after=15 "$limit" "$@" > "$work/$name.log" 2>&1 < /dev/null
  rc=$?
  tail -n 15 "$work/$name.log"
  cat "$work/$name.log" >> "$log"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" \
    "$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')" \
    "$limit" "$*" >> "$work/steps.tsv"
  say "=== $name: exit $rc"
  [ "$rc" -eq 0 ] || failed=1
  report
}

# setup: the carried wheels into a scratch folder ahead of everything on PYTHONPATH.
if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" > /dev/null; then
  site="$work/site"
  step setup 180 bash -c "'$PYTHON' -m pip install -q --no-index --no-deps --no-compile \
--no-cache-dir --upgrade --target '$site' $WHEELS/*.whl"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" GPU_CHECK_SITE="$site"
  export PATH="$site/bin:$PATH"
else
  say "=== setup: no wheels${WHEELS:+ in $WHEELS}, using the packages installed"
fi

step env 90 "$PYTHON" bench/gpu_check.py env --json "$work/env.json"

if [ "$mode" = dry ]; then
  # The DAG step's own plumbing, cheaply (tests/test_dvc.py runs the whole DAG, and the stages
  # with a device key cost minutes here): the media stages run as --prepare runs them, then a
  # scratch project with the device overrides applied takes them in as a GPU machine without
  # ffmpeg does.
  step dag 150 bash -c "'$PYTHON' bench/gpu_check.py prepare --out '$work/prepared' && \
'$PYTHON' bench/gpu_check.py dag --work '$work/dag' --device cpu --media prepared \
--prepared '$work/prepared' --stages download extract --json '$work/dag.json'"
  step train_bf16 60 "$PYTHON" bench/train_throughput.py demo 4 --precision bf16 \
    --steps 1 --warmup 1 --image-grid 4 --json "$work/train_bf16.json"
  step train_ckpt 60 "$PYTHON" bench/train_throughput.py demo 4 --precision fp32 \
    --checkpointing --steps 1 --warmup 1 --image-grid 4 --json "$work/train_ckpt.json"
  step generate 60 "$PYTHON" bench/generate.py demo --batches 1 2 --steps 2 --threads 1 \
    --json "$work/generate.json"
  step im2wav 60 "$PYTHON" bench/im2wav_sampler.py --seconds 0.01 --tokens 4 --threads 1 \
    --json "$work/im2wav.json"
  step encoders 60 "$PYTHON" bench/tokenize_throughput.py --work "$work/encoders" --gpu-only \
    --official-device cpu --official-batch 2 --official-crop 32 --gpu-repeat 1 \
    --json "$work/encoders.json"
  step tokenize 150 "$PYTHON" bench/tokenize_throughput.py --work "$work/tokenize" \
    --classes 2 --train 1 --test 1 --image-size 32 --repeat 1 --official-device none \
    --json "$work/tokenize.json"
else
  step dag 240 "$PYTHON" bench/gpu_check.py dag --work "$work/dag" --device cuda \
    --prepared "$PREPARED/dag" --json "$work/dag.json"
  step train_bf16 150 "$PYTHON" bench/train_throughput.py paper 128 --precision bf16 --compile \
    --json "$work/train_bf16.json"
  step train_ckpt 90 "$PYTHON" bench/train_throughput.py paper 32 --precision fp16 \
    --checkpointing --json "$work/train_ckpt.json"
  step generate 120 "$PYTHON" bench/generate.py paper --batches 1 64 --json "$work/generate.json"
  # Per-token cost is flat under factorised attention: 2,048 tokens per level are timed.
  step im2wav 120 "$PYTHON" bench/im2wav_sampler.py --tokens 2048 --json "$work/im2wav.json"
  step encoders 90 "$PYTHON" bench/tokenize_throughput.py --work "$work/encoders" --gpu-only \
    --json "$work/encoders.json"
  if [ -d "$PREPARED/tokenize" ]; then
    cp -r "$PREPARED/tokenize" "$work/tokenize"
  fi
  step tokenize 150 "$PYTHON" bench/tokenize_throughput.py --work "$work/tokenize" \
    "${TOKENIZE_SET[@]}" --repeat 2 --official-device none --json "$work/tokenize.json"
fi

cat "$out/gpu_check.md"
if [ "$mode" = dry ] && [ -z "${GPU_CHECK_KEEP:-}" ]; then
  rm -rf "$work"
else
  say "work folder (stage outputs, per-step logs): $work"
fi
exit "$failed"
