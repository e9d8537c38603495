#!/usr/bin/env bash
# GPU day (issue #17): on a CUDA machine, everything the project measures on a GPU in one run of
# under 10 minutes, into one results folder:
#   env/          device.txt (the CUDA check: device name, capability), nvidia-smi.txt,
#                 versions.txt, collect_env.txt, pip-freeze.txt, git.txt
#   validate.txt  `tritformer validate --quick` on the GPU (its exit status: summary.txt)
#   bench/OP/     `tritformer bench --op OP --quick` against every provider (naive, SDPA with
#                 each backend pinned, flash-attn and FlexAttention when installed: a missing
#                 one is skipped with its reason in bench/OP/skips.txt); bench/OP.log its output
#   inspect.txt   `tritformer inspect` for this device's arch (registers, spills, shared memory)
#   summary.txt   every step: status, exit status, wall time, timeout, output
# A failing step does not stop the others; the exit status is 1 when any step failed or timed
# out, 2 for a usage error or when no CUDA device is visible (nothing is run or written then),
# 130/143 when interrupted (Ctrl-C / SIGTERM: the step running is stopped as by its timeout).
#
# Every step runs under `timeout`: at its limit the step gets SIGINT (`tritformer bench` then
# writes its partial report: results.csv and report.md marked PARTIAL), then SIGKILL GRACE
# seconds later. The limits below sum to the budget (525 s); with a grace period per step the
# worst case is 525 + 12 * 5 = 585 s, under 10 minutes. --budget scales every limit.
#
# --dry-run prints the commands (and the skips) and runs nothing: what can be checked without a
# GPU (tests/test_gpu_day.py does). Style: shellcheck-clean bash, as .ci/run.
set -euo pipefail

PROG=gpu_day.sh
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OPS=(attention masked varlen gpt)
# tritformer._cliargs.BENCH_PROVIDERS, in its order (tests/test_gpu_day.py checks they agree)
ALL_PROVIDERS=(naive sdpa sdpa_math sdpa_flash sdpa_efficient sdpa_cudnn tritformer flash_attn flex)
ARCHS=(sm_80 sm_86 sm_89 sm_90 sm_120)  # `tritformer inspect --arch` choices
GRACE=5  # s between a step's SIGINT and its SIGKILL

# Step time limits at the default budget, seconds (sum: 525). On a GPU the kernels' first
# compiles dominate, not the measurements:
#   check 30         import torch, CUDA init: is a device visible, its name and capability
#   nvidia-smi 5     driver, GPU, clocks, memory in use
#   versions 15      python, torch (+CUDA, cuDNN), triton, tritformer (and where it is
#                    imported from), flash_attn / FlexAttention availability
#   collect_env 25   python -m torch.utils.collect_env
#   pip-freeze 10    python -m pip freeze
#   git 5            the commit measured (git describe --dirty)
#   validate 100     --quick: 33 cases (3 dtypes), about 2 s each (compiling their kernels)
#   attention 130    --quick on CUDA: 56 cases (seqlen 1K and 4K, D=64, causal and not, 9
#                    providers, fwd/bwd/fwd+bwd, do_bench) + the autotuner's first runs
#   masked 65        --quick: 56 cases (padding and document masks)
#   varlen 45        --quick: 16 cases
#   gpt 55           GPT-2 small, 3 providers, train step and cached decode: 9 cases
#   inspect 40       AOT compile of the attention / masked / varlen kernels' configs for this
#                    arch, head dims 64 and 128, bf16, on all CPU cores (--jobs 0): 137 configs,
#                    about 190 CPU-seconds (1.4 s each, measured for sm_90 on a CPU here), so
#                    within the limit from 8 cores (gpt's decode / FFN kernels: 38 more)
declare -A LIMIT=([check]=30 [nvidia-smi]=5 [versions]=15 [collect_env]=25 [pip-freeze]=10
                  [git]=5 [validate]=100 [bench-attention]=130 [bench-masked]=65
                  [bench-varlen]=45 [bench-gpt]=55 [inspect]=40)
DEFAULT_BUDGET=0
for _s in "${!LIMIT[@]}"; do DEFAULT_BUDGET=$((DEFAULT_BUDGET + ${LIMIT[$_s]})); done

usage() {
  cat <<EOF
usage: benchmarks/$PROG [--out DIR] [--python PY] [--budget SECONDS] [--full]
                          [--providers "P1 P2 ..."] [--arch SM] [--dry-run] [-h]

On a CUDA machine: tritformer validate --quick, the attention / masked / varlen / gpt
benchmarks against SDPA (each backend), flash-attn and FlexAttention (when installed), and
the inspect compile report, with the environment, into one results folder with a summary.txt
(every step's status, exit status and wall time). At most $((DEFAULT_BUDGET + ${#LIMIT[@]} * GRACE)) s.
Run it where tritformer is installed (pip install -e ".[bench]").

options:
  --out DIR          results folder, new or empty (default: gpu-day-<UTC timestamp>)
  --python PY        the Python with torch (CUDA build), triton and tritformer
                     (default: \$PYTHON, else python)
  --budget SECONDS   the step time limits' sum (default: $DEFAULT_BUDGET); each step's limit
                     scales with it; the worst case adds $GRACE s per step
  --full             bench and validate without --quick (full sweeps: they take longer than
                     the default budget; raise --budget, or the steps stop at their limits)
  --providers LIST   bench providers, space- or comma-separated (default: all of
                     ${ALL_PROVIDERS[*]})
  --arch SM          inspect's --arch (default: this device's, from its compute capability;
                     one of ${ARCHS[*]})
  --dry-run          print the commands it would run, run nothing (no GPU needed)
  -h, --help         this help

exit status: 0 every step passed; 1 a step failed or timed out (the others still ran);
2 usage error, or no CUDA device visible; 130 / 143 interrupted (SIGINT / SIGTERM).
EOF
}

usage_error() {
  echo "$PROG: error: $*" >&2
  echo "($PROG --help lists the options)" >&2
  exit 2
}

contains() {  # contains WORD LIST...: whether WORD is one of LIST
  local w=$1
  shift
  local x
  for x in "$@"; do [ "$x" = "$w" ] && return 0; done
  return 1
}

# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------
OUT=""
PY="${PYTHON:-python}"
BUDGET=$DEFAULT_BUDGET
QUICK=1
DRY=0
ARCH=""
PROVIDERS=("${ALL_PROVIDERS[@]}")

while [ $# -gt 0 ]; do
  opt=$1
  val=""
  case "$opt" in
    --*=*)
      val=${opt#*=}
      opt=${opt%%=*}
      case "$opt" in
        --dry-run | --full | --help) usage_error "$opt takes no value" ;;
      esac ;;
    --out | --python | --budget | --providers | --arch)
      [ $# -ge 2 ] || usage_error "$opt needs a value"
      val=$2
      shift ;;
  esac
  case "$opt" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY=1 ;;
    --full) QUICK=0 ;;
    --out) OUT=$val ;;
    --python) PY=$val ;;
    --budget) BUDGET=$val ;;
    --providers) IFS=', ' read -r -a PROVIDERS <<<"$val" ;;
    --arch) ARCH=$val ;;
    *) usage_error "unknown argument: $1" ;;
  esac
  shift
done

if ! [[ "$BUDGET" =~ ^[0-9]{1,6}$ ]] || [ "$BUDGET" -eq 0 ]; then
  usage_error "--budget takes a positive number of seconds, not '$BUDGET'"
fi
BUDGET=$((10#$BUDGET))  # 090: ninety, not octal
[ ${#PROVIDERS[@]} -gt 0 ] || usage_error "--providers: no provider given"
for p in "${PROVIDERS[@]}"; do
  contains "$p" "${ALL_PROVIDERS[@]}" ||
    usage_error "unknown provider '$p' (choose from ${ALL_PROVIDERS[*]})"
done
[ -z "$ARCH" ] || contains "$ARCH" "${ARCHS[@]}" ||
  usage_error "--arch: unknown architecture '$ARCH' (choose from ${ARCHS[*]})"
if [ -z "$PY" ] || ! command -v "$PY" >/dev/null 2>&1; then
  usage_error "python not found: '$PY' (--python)"
fi
command -v timeout >/dev/null 2>&1 || usage_error "the timeout command (GNU coreutils) is needed"
[ -n "$OUT" ] || OUT="gpu-day-$(date -u +%Y%m%dT%H%M%SZ)"
if [ -e "$OUT" ] && { [ ! -d "$OUT" ] || [ -n "$(ls -A "$OUT")" ]; }; then
  usage_error "--out $OUT exists and is not an empty folder (one run per results folder)"
fi

limit() {  # the time limit of step $1 at this budget, s (at least 1: timeout 0 means none)
  local t=$(((${LIMIT[$1]} * BUDGET + DEFAULT_BUDGET / 2) / DEFAULT_BUDGET))
  echo $((t > 0 ? t : 1))
}

# ---------------------------------------------------------------------------------------------
# The CUDA check (before anything is written)
# ---------------------------------------------------------------------------------------------
CHECK_PY='import torch
ok = torch.cuda.is_available()
print("cuda_available:", ok)
if ok:
    major, minor = torch.cuda.get_device_capability()
    print("device:", torch.cuda.get_device_name())
    print("capability:", f"{major}.{minor}")
    print("device_count:", torch.cuda.device_count())
print("torch:", torch.__version__, "CUDA", torch.version.cuda)'

VERSIONS_PY='import importlib.util, platform, sys
import torch, triton, tritformer
print("python:", sys.version.split()[0], sys.executable, platform.platform())
print("torch:", torch.__version__, "CUDA", torch.version.cuda, "cuDNN",
      torch.backends.cudnn.version())
print("triton:", triton.__version__)
print("tritformer:", tritformer.__version__, tritformer.__file__)
if importlib.util.find_spec("flash_attn"):
    import flash_attn
    print("flash_attn:", flash_attn.__version__)
else:
    print("flash_attn: not installed (its providers are skipped)")
print("flex_attention:", bool(importlib.util.find_spec("torch.nn.attention.flex_attention")))'

arch_for() {  # inspect's --arch for compute capability $1 (major.minor), as _launch.arch_family
  local major=${1%%.*} minor=${1#*.}
  if [ "$major" -ge 12 ]; then echo sm_120
  elif [ "$major" -ge 9 ]; then echo sm_90
  elif [ "$major" -eq 8 ] && [ "$minor" -eq 9 ]; then echo sm_89
  elif [ "$major" -eq 8 ] && [ "$minor" -ge 6 ]; then echo sm_86
  else echo sm_80
  fi
}

DEVICE="(dry run)"
if [ "$DRY" = 0 ]; then
  check_rc=0
  check_out=$(timeout -k "$GRACE" "$(limit check)" "$PY" -c "$CHECK_PY" 2>&1) || check_rc=$?
  if [ "$check_rc" != 0 ] || ! grep -qx "cuda_available: True" <<<"$check_out"; then
    {
      echo "$PROG: no CUDA device is visible to $PY (torch.cuda.is_available() is not True):"
      sed 's/^/  /' <<<"$check_out" | tail -n 5
      echo "this script measures a GPU and runs nothing without one; --dry-run prints its commands"
    } >&2
    exit 2
  fi
  DEVICE=$(sed -n 's/^device: //p' <<<"$check_out")
  capability=$(sed -n 's/^capability: //p' <<<"$check_out")
  [ -n "$ARCH" ] || ARCH=$(arch_for "$capability")
  DEVICE="$DEVICE (compute capability $capability)"
  mkdir -p "$OUT/env"
  OUT="$(cd "$OUT" && pwd)"
  printf '%s\n' "$check_out" >"$OUT/env/device.txt"
fi
[ -n "$ARCH" ] || ARCH="sm_XX"  # dry run: detected at run time

# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------
unset TRITON_INTERPRET           # the kernels compile for the GPU, never interpreted
export PYTHONUNBUFFERED=1        # logs up to date when a step is stopped at its limit

STEPS=()      # summary rows, in order
FAILED=()     # steps that did not pass
INTERRUPTED=""
NSIG=0
CHILD=""
START=$(date -u +%Y-%m-%dT%H:%M:%SZ)
T0=$SECONDS

on_signal() {  # stop the step running (as its timeout would); no further steps
  INTERRUPTED=$1
  NSIG=$((NSIG + 1))
  if [ -n "$CHILD" ]; then kill -INT "$CHILD" 2>/dev/null || true; fi
  # tests only: widen the window in which the step exits (and is reaped) before `step` looks
  if [ -n "${GPU_DAY_TEST_TRAP_DELAY:-}" ]; then sleep "$GPU_DAY_TEST_TRAP_DELAY"; fi
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM

write_summary() {
  [ "$DRY" = 0 ] || return 0
  {
    echo "tritformer GPU day: $START .. $(date -u +%Y-%m-%dT%H:%M:%SZ), $((SECONDS - T0)) s"
    echo "device: $DEVICE"
    echo "python: $PY; bench --op ${OPS[*]}$([ "$QUICK" = 1 ] && echo " --quick")" \
         "--providers ${PROVIDERS[*]}; inspect --arch $ARCH"
    echo "budget: $BUDGET s of step limits (+${GRACE} s grace each); GPU figures come only from" \
         "these results, quoted with the device above"
    printf '%-16s %-11s %5s %8s %8s  %s\n' step status exit seconds limit output
    printf '%s\n' "${STEPS[@]}"
    if [ -n "$INTERRUPTED" ]; then
      echo "result: interrupted (SIG$INTERRUPTED); steps after it were not run"
    elif [ ${#FAILED[@]} -gt 0 ]; then
      echo "result: ${#FAILED[@]} of ${#STEPS[@]} steps did not pass: ${FAILED[*]}"
    else
      echo "result: all ${#STEPS[@]} steps passed"
    fi
  } >"$OUT/summary.txt.tmp"
  mv "$OUT/summary.txt.tmp" "$OUT/summary.txt"
}

row() {  # row NAME STATUS EXIT SECONDS LIMIT OUTPUT
  STEPS+=("$(printf '%-16s %-11s %5s %8s %8s  %s' "$@")")
  write_summary
}

skip() {  # skip NAME REASON
  if [ "$DRY" = 1 ]; then
    printf '%-16s skipped: %s\n' "$1" "$2"
  else
    echo "[$1] skipped: $2"
    row "$1" skipped - - - "$2"
  fi
}

show() {  # show NAME COMMAND...: the dry run's line (a multi-line -c program: its first line)
  local name=$1 arg
  shift
  printf '%-16s %4ss ' "$name" "$(limit "$name")"
  for arg in "$@"; do
    if [[ "$arg" == *$'\n'* ]]; then printf ' %q...' "${arg%%$'\n'*}"; else printf ' %q' "$arg"; fi
  done
}

step() {  # step NAME LOG COMMAND...: run COMMAND under its limit, stdout+stderr to OUT/LOG
  local name=$1 log=$2
  shift 2
  local secs
  secs=$(limit "$name")
  if [ "$DRY" = 1 ]; then
    show "$name" "$@"
    printf ' > %q\n' "$OUT/$log"
    return 0
  fi
  if [ -n "$INTERRUPTED" ]; then
    row "$name" not-run - - "$secs" "$log"
    return 0
  fi
  mkdir -p "$(dirname "$OUT/$log")"
  echo "[$name] limit ${secs} s: $*"
  local t=$SECONDS rc=0
  # in the background so that a trapped Ctrl-C / SIGTERM interrupts `wait` and is forwarded:
  # timeout runs the step in its own process group, which the terminal's Ctrl-C never reaches
  timeout -s INT -k "$GRACE" "$secs" "$@" >"$OUT/$log" 2>&1 </dev/null &
  CHILD=$!
  local seen
  while :; do
    seen=$NSIG rc=0
    wait "$CHILD" || rc=$?
    # a trapped signal ends `wait` early with 128+n, whether or not the step is still running
    # (it may already have exited and been reaped): wait again for the step's own status,
    # which bash keeps for `wait PID` after the reap
    [ "$NSIG" != "$seen" ] || break
  done
  CHILD=""
  local took=$((SECONDS - t)) status=ok
  if [ -n "$INTERRUPTED" ]; then status=interrupted
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status=TIMEOUT
  elif [ "$rc" != 0 ]; then status=FAILED
  fi
  [ "$status" = ok ] || FAILED+=("$name")
  echo "# $PROG: $name exit $rc after $took s (limit $secs s)" >>"$OUT/$log"
  echo "[$name] $status (exit $rc) in $took s"
  if [ "$status" != ok ]; then tail -n 3 "$OUT/$log" | sed 's/^/    /'; fi
  row "$name" "$status" "$rc" "$took" "$secs" "$log"
}

quick=()
[ "$QUICK" = 0 ] || quick=(--quick)

if [ "$DRY" = 1 ]; then
  echo "# $PROG --dry-run: nothing is run. Results folder: $OUT; budget $BUDGET s" \
       "(+$GRACE s grace per step); device: checked first, then every step in turn:"
  show check "$PY" -c "$CHECK_PY"
  echo "   (no CUDA device: exit 2)"
  [ "$ARCH" != sm_XX ] || echo "# sm_XX: inspect's --arch, from the device's compute capability"
fi

if command -v nvidia-smi >/dev/null 2>&1; then
  step nvidia-smi env/nvidia-smi.txt nvidia-smi
else
  skip nvidia-smi "nvidia-smi not found"
fi
step versions env/versions.txt "$PY" -c "$VERSIONS_PY"
step collect_env env/collect_env.txt "$PY" -m torch.utils.collect_env
step pip-freeze env/pip-freeze.txt "$PY" -m pip freeze
if command -v git >/dev/null 2>&1 && [ -e "$REPO/.git" ]; then
  step git env/git.txt git -C "$REPO" describe --always --dirty --abbrev=40
else
  skip git "not a git checkout"
fi
step validate validate.txt "$PY" -m tritformer validate ${quick[@]+"${quick[@]}"}
for op in "${OPS[@]}"; do
  step "bench-$op" "bench/$op.log" "$PY" -m tritformer bench --op "$op" ${quick[@]+"${quick[@]}"} \
    --out "$OUT/bench/$op" --providers "${PROVIDERS[@]}"
done
# the fused attention kernels of the four benchmarks (not gpt's decode / FFN ones: time)
step inspect inspect.txt "$PY" -m tritformer inspect --op attention masked varlen --arch "$ARCH" \
  --head-dim 64 128 --dtype bf16 --jobs 0

if [ "$DRY" = 1 ]; then
  echo "# then $OUT/summary.txt: every step's status, exit status, seconds and limit"
  exit 0
fi
write_summary
echo
cat "$OUT/summary.txt"
if [ "$INTERRUPTED" = INT ]; then exit 130; fi
if [ "$INTERRUPTED" = TERM ]; then exit 143; fi
if [ ${#FAILED[@]} -gt 0 ]; then exit 1; fi
