#!/usr/bin/env bash
# The GPU campaign: what a lent H100/H200 machine runs for rlvrw, in one call of at most 9 minutes (540 s).
#
#   bench/gpu_campaign.sh                   on the GPU machine: install, GPU tests, self-check, benchmarks -> $OUT
#   bench/gpu_campaign.sh --dry-run         anywhere, CPU too (CI runs it): list the stages and their budgets, and
#                                           check that every test file, test id and benchmark they name exists
#   bench/gpu_campaign.sh --fetch-wheels    here, where PyPI is reachable: the optional packages as wheels in .whl/
#   bench/gpu_campaign.sh --only A,B        run only stages A and B (a rerun); --skip A,B runs all but those
#
# The machine: a CUDA torch 2.11, Triton 3.6, nvcc, pytest and pytest-benchmark, no network. Missing there and
# carried as wheels (--fetch-wheels): liger-kernel (the Liger rows), vector-quantize-pytorch and its dependencies
# (the FSQ peer rows), json-repair. flash-attn and xformers are not carried (no wheel for that torch, too large):
# their tests skip and say so.
#
# Remote invocation, one call (prepare first, here: bench/gpu_campaign.sh --fetch-wheels):
#   command:    PYTHONUNBUFFERED=1 bash bench/gpu_campaign.sh
#   carry:      [".whl"]
#   timeout_s:  570
# Then commit the <device>-<date>.json and .md that come back from $OUT into bench/results/.
# The script stops itself at 540 s (CAMPAIGN_SECONDS): each stage has a time budget, runs under `timeout` for it,
# and is skipped, saying so, when its budget no longer fits before the report. The stages, most important first:
#   setup (install, build rlvrw._C), sync-graph (no host sync in a whole RL step, the CUDA-graph rollout),
#   gpu-tests (every other `gpu`-marked test), bench-grpo, bench-linear, bench-rl-step (pytest-benchmark at the
#   target shapes, one session each), selfcheck (`rlvrw`: every op on every backend against float64), bench-reward,
#   bench-decode, bench-fsq, bench-group-norm, kernel-tests (the Triton kernel tests on the GPU, in the time left).
# The budgets add up to more than 540 s: the last stages run when the first ones take less than their budgets;
# otherwise rerun them (--only) while the machine is still warm.
# Results in $OUT (default bench/results): <device>-<date>.json (pytest-benchmark JSON of every bench stage, merged)
# and .md (bench/report.py: tables, targets, the CUDA-vs-Triton race per shape), campaign.log (everything printed,
# a summary at the end), campaign-env.json (device, driver, versions, rlvrw.ops.report()), campaign-selfcheck.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-python3}
TOTAL=${CAMPAIGN_SECONDS:-540}
SCALE=${CAMPAIGN_BUDGET_SCALE:-1}  # an integer factor on every stage budget, for slower machines (CPU tests of this)
REPORT_RESERVE=20  # seconds kept for writing the report
OUT=${OUT:-$REPO/bench/results}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rlvrw-campaign.XXXXXX")
START=$(date +%s)
export PIP_ROOT_USER_ACTION=ignore
export TRITON_INTERPRET=0  # on a GPU the kernels must compile, even where the calling shell exports 1

# ---- what each stage runs ------------------------------------------------------------------------------------------
# Most important first. Budgets are estimates (nothing has run on a GPU yet): campaign.log records what each took.
STAGES=(setup sync-graph gpu-tests bench-grpo bench-linear bench-rl-step selfcheck bench-reward bench-decode bench-fsq
        bench-group-norm kernel-tests)
declare -A BUDGET=([setup]=120 [sync-graph]=45 [gpu-tests]=90 [bench-grpo]=60 [bench-linear]=40 [bench-rl-step]=60
                   [selfcheck]=75 [bench-reward]=35 [bench-decode]=50 [bench-fsq]=25 [bench-group-norm]=25
                   [kernel-tests]=45)
declare -A ROUNDS=([bench-decode]=3)  # timed rounds (RLVRW_BENCH_ROUNDS) where the default of 10 would not fit

SYNC_GRAPH_TESTS=(
  tests/test_rl_trainer.py::test_train_step_has_no_host_sync
  tests/test_rollout.py::test_rollout_has_no_host_sync
  tests/test_rollout.py::test_cuda_graph_rollout
  "tests/test_transformer.py::test_decode_step_captured_in_cuda_graph[auto]"
)
GPU_TEST_FILES=(  # their `gpu`-marked tests, but those of sync-graph
  tests/test_attention.py tests/test_csrc_build.py tests/test_fsq.py tests/test_lang_train.py tests/test_lang_vllm.py
  tests/test_reward.py tests/test_rl_trainer.py tests/test_rollout.py tests/test_tokenizer.py tests/test_transformer.py
)
KERNEL_TEST_FILES=(  # tests that put their tensors on the GPU when there is one (kernel_device)
  tests/test_kernels_logprobs.py tests/test_ops_logprobs.py tests/test_ops_grpo.py tests/test_fsq.py
  tests/test_group_norm_silu.py
)
bench_ids() {  # FILE::TEST SHAPES... IMPLS... -> FILE::TEST[shape-impl] for each pair
  local test=$1 shapes=$2 impls=$3 s i
  for s in $shapes; do for i in $impls; do echo "$test[$s-$i]"; done; done
}
mapfile -t BENCH_GRPO < <(bench_ids bench/test_bench_grpo.py::test_grpo_loss_from_logits "lm video" \
                                    "rlvrw rlvrw-triton rlvrw-cuda eager liger")
mapfile -t BENCH_LINEAR < <(bench_ids bench/test_bench_logprobs.py::test_linear_token_logprobs "lm video" \
                                      "rlvrw rlvrw-triton rlvrw-cuda eager")
BENCH_RL_STEP=(bench/test_bench_rl_step.py)
BENCH_REWARD=(bench/test_bench_reward.py)
BENCH_DECODE=(bench/test_bench_decode.py)
BENCH_FSQ=(bench/test_bench_fsq.py)
BENCH_GROUP_NORM=(bench/test_bench_group_norm.py)
declare -A BENCH_OF=([bench-grpo]=BENCH_GRPO [bench-linear]=BENCH_LINEAR [bench-rl-step]=BENCH_RL_STEP
                     [bench-reward]=BENCH_REWARD [bench-decode]=BENCH_DECODE [bench-fsq]=BENCH_FSQ
                     [bench-group-norm]=BENCH_GROUP_NORM)
WHEELS=(liger-kernel==0.8.5 vector-quantize-pytorch==1.32.0 einx==0.4.3 frozendict==2.5.1 loguru==0.7.3
        torch-einops-utils==0.2.0 json-repair==0.64.6)

# ---- helpers --------------------------------------------------------------------------------------------------------
log() { echo "[campaign $(( $(date +%s) - START ))s] $*"; }
SUMMARY=()
record() { SUMMARY+=("$(printf '%-17s %s' "$1" "$2")"); log "$1: $2"; }
ONLY="" SKIP=""
selected() {
  [[ -n $ONLY && ",$ONLY," != *",$1,"* ]] && return 1
  [[ -n $SKIP && ",$SKIP," == *",$1,"* ]] && return 1
  return 0
}
pytest_in_time() {  # LIMIT ARGS...: pytest, interrupted (reports and JSON still written) at LIMIT seconds
  local limit=$1; shift
  timeout -s INT -k 10 "$limit" "$PYTHON" -m pytest -p no:cacheprovider -q -rfEs "$@"
}

# ---- stages ---------------------------------------------------------------------------------------------------------
stage_setup() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
      .whl/*.whl || return 1
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    log "wheels from .whl: $(cd .whl && ls *.whl | tr '\n' ' ')"
  else
    log "no .whl folder: liger and vector-quantize-pytorch rows will be skipped"
  fi
  # the extension for this GPU only (the sm_80/sm_90/PTX build of setup.py takes three times as long)
  local arch
  arch=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || return 1
  TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) timeout -k 10 "$1" \
    "$PYTHON" -m pip install -v --no-index --no-deps --no-build-isolation -e . > "$WORK/pip.log" 2>&1
  local rc=$?
  grep -E "^rlvrw: |error|Error" "$WORK/pip.log" | tail -20
  if (( rc != 0 )); then
    tail -40 "$WORK/pip.log"
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # the Triton and reference backends still run from here
    return $rc
  fi
  "$PYTHON" -c "from rlvrw import _C_loader as L; ok = L.load(); print('rlvrw._C loaded:', ok, L.LOAD_ERROR or '')"
}

write_env() {
  "$PYTHON" - "$OUT/campaign-env.json" <<'PY'
import json, platform, subprocess, sys
from importlib import metadata

def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as err:
        return f"unavailable: {err}"

info = {"python": sys.version.split()[0], "platform": platform.platform(),
        "nvidia_smi": run("nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                          "--format=csv,noheader"),
        "nvcc": run("nvcc", "--version").splitlines()[-1:]}
packages = ["torch", "triton", "cupy-cuda13x", "pytest", "pytest-benchmark", "transformers", "peft", "liger-kernel",
            "vector-quantize-pytorch", "flash-attn", "xformers", "vllm", "rlvrw"]
info["packages"] = {}
for name in packages:
    try:
        info["packages"][name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        info["packages"][name] = None
try:
    import torch
    info["torch_cuda"] = torch.version.cuda
    info["cudnn"] = torch.backends.cudnn.version()
    from rlvrw.ops import report
    info["rlvrw"] = report()
except Exception as err:
    info["rlvrw"] = f"unavailable: {type(err).__name__}: {err}"
with open(sys.argv[1], "w") as f:
    json.dump(info, f, indent=2, default=str)
print(json.dumps({k: info[k] for k in ("nvidia_smi", "packages")}, default=str))
PY
}

stage_sync_graph() { pytest_in_time "$1" "${SYNC_GRAPH_TESTS[@]}"; }

stage_selfcheck() {
  timeout -s INT -k 10 "$1" "$PYTHON" -m rlvrw selfcheck 2>&1 | tee "$OUT/campaign-selfcheck.txt"
}

stage_gpu_tests() {
  local deselect=() id
  for id in "${SYNC_GRAPH_TESTS[@]}"; do deselect+=(--deselect "$id"); done
  pytest_in_time "$1" -m gpu "${deselect[@]}" "${GPU_TEST_FILES[@]}"
}

stage_kernel_tests() { pytest_in_time "$1" --maxfail=30 "${KERNEL_TEST_FILES[@]}"; }

stage_bench() {  # NAME LIMIT
  local name=$1 limit=$2 list="${BENCH_OF[$1]}[@]"
  RLVRW_BENCH_ROUNDS=${ROUNDS[$name]:-${RLVRW_BENCH_ROUNDS:-10}} pytest_in_time "$limit" --benchmark-only \
    --benchmark-columns=min,median,iqr,rounds --benchmark-json="$WORK/$name.json" "${!list}"
}

run_stage() {  # NAME: run it within its budget, or say why not
  local name=$1 budget=$(( BUDGET[$1] * SCALE )) left rc t0
  selected "$name" || return 0
  left=$(( START + TOTAL - REPORT_RESERVE - $(date +%s) ))
  [[ $name == kernel-tests ]] && (( left > budget )) && budget=$left  # the last stage takes what is left
  if (( budget > left )); then
    record "$name" "SKIPPED: would overrun (budget ${budget}s, ${left}s left)"
    return 0
  fi
  log "== $name (budget ${budget}s, ${left}s left)"
  t0=$(date +%s)
  case $name in
    setup) stage_setup "$budget" ;;
    sync-graph) stage_sync_graph "$budget" ;;
    selfcheck) stage_selfcheck "$budget" ;;
    gpu-tests) stage_gpu_tests "$budget" ;;
    kernel-tests) stage_kernel_tests "$budget" ;;
    bench-*) stage_bench "$name" "$budget" ;;
  esac
  rc=$?
  local took=$(( $(date +%s) - t0 ))
  if (( rc == 124 || rc == 130 || rc == 137 )); then
    record "$name" "STOPPED at its budget after ${took}s (partial results kept)"
  elif (( rc == 0 )); then
    record "$name" "ok in ${took}s"
  else
    record "$name" "FAILED (exit $rc) in ${took}s"
  fi
  return 0
}

report() {
  local runs=("$WORK"/bench-*.json)
  if [[ ! -e ${runs[0]} ]]; then
    record report "no benchmark JSON (no bench stage ran to the end of a benchmark)"
    return
  fi
  if "$PYTHON" bench/report.py "${runs[@]}" --out "$OUT"; then
    record report "ok: $(ls "$OUT" | grep -E '^[a-z0-9-]+-[0-9]{4}-[0-9]{2}-[0-9]{2}\.(json|md)$' | tr '\n' ' ')"
  else
    record report "FAILED"
  fi
}

# ---- dry run: the stages, and a check that what they name exists ----------------------------------------------------
dry_run() {
  local name
  echo "GPU campaign: ${TOTAL}s in all, ${REPORT_RESERVE}s of it kept for the report; results to $OUT"
  for name in "${STAGES[@]}"; do
    selected "$name" || continue
    case $name in
      setup) what="wheels from .whl, pip install --no-deps --no-build-isolation -e . (builds rlvrw._C)" ;;
      sync-graph) what="${SYNC_GRAPH_TESTS[*]}" ;;
      selfcheck) what="python -m rlvrw selfcheck" ;;
      gpu-tests) what="-m gpu ${GPU_TEST_FILES[*]} (but sync-graph's)" ;;
      kernel-tests) what="${KERNEL_TEST_FILES[*]} (the time left)" ;;
      bench-*) local list="${BENCH_OF[$name]}[@]"; what="${!list}" ;;
    esac
    printf '%-17s %4ss  %s\n' "$name" "${BUDGET[$name]}" "$what"
  done
  local items=() id list  # what the selected stages name
  if selected sync-graph; then for id in "${SYNC_GRAPH_TESTS[@]}"; do items+=("gpu-id=$id"); done; fi
  if selected gpu-tests; then for id in "${GPU_TEST_FILES[@]}"; do items+=("gpu-file=$id"); done; fi
  if selected kernel-tests; then for id in "${KERNEL_TEST_FILES[@]}"; do items+=("file=$id"); done; fi
  for name in "${!BENCH_OF[@]}"; do
    selected "$name" || continue
    list="${BENCH_OF[$name]}[@]"
    for id in "${!list}"; do [[ $id == *::* ]] && items+=("id=$id") || items+=("file=$id"); done
  done
  if [[ ! -f bench/report.py || ! -f rlvrw/selfcheck.py ]]; then
    echo "missing: bench/report.py or rlvrw/selfcheck.py"
    return 1
  fi
  (( ${#items[@]} )) || return 0
  "$PYTHON" - "${items[@]}" <<'PY'
import subprocess, sys
from pathlib import Path

items = [arg.split("=", 1) for arg in sys.argv[1:]]

def collect(paths, *options):
    """Node ids pytest collects from ``paths`` (a file that does not exist is reported, not collected)."""
    existing = sorted({p for p in paths if Path(p).is_file()})
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          *options, *existing], capture_output=True, text=True)
    ids = {line.strip() for line in out.stdout.splitlines() if "::" in line}
    if out.returncode not in (0, 5):
        sys.exit(f"pytest --collect-only failed ({out.returncode}):\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
    return ids

file_of = lambda target: target.split("::")[0]
gpu_files = [file_of(t) for kind, t in items if kind.startswith("gpu-")]
other_files = [file_of(t) for kind, t in items if not kind.startswith("gpu-")]
gpu = collect(gpu_files, "-m", "gpu") if gpu_files else set()
everything = collect(other_files) if other_files else set()
missing = []
for kind, target in items:
    if not Path(file_of(target)).is_file():
        missing.append(f"{target}: no such file")
    elif kind == "gpu-id" and target not in gpu:
        missing.append(f"{target}: not a collected gpu-marked test")
    elif kind == "id" and target not in everything:
        missing.append(f"{target}: not collected")
    elif kind == "gpu-file" and not any(i.startswith(target + "::") for i in gpu):
        missing.append(f"{target}: no gpu-marked test")
    elif kind == "file" and not any(i.startswith(target + "::") for i in everything):
        missing.append(f"{target}: no test collected")
print(f"checked {len(items)} names: {len(gpu)} gpu-marked tests and {len(everything)} others collected")
if missing:
    print("missing:\n  " + "\n  ".join(missing))
    sys.exit(1)
PY
}

fetch_wheels() {
  mkdir -p .whl
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}" && ls -la .whl
}

# ---- main -----------------------------------------------------------------------------------------------------------
MODE=run
while (( $# )); do
  case $1 in
    --dry-run) MODE=dry ;;
    --fetch-wheels) MODE=fetch ;;
    --only) ONLY=$2; shift ;;
    --only=*) ONLY=${1#*=} ;;
    --skip) SKIP=$2; shift ;;
    --skip=*) SKIP=${1#*=} ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for name in ${ONLY//,/ } ${SKIP//,/ }; do
  [[ " ${STAGES[*]} " == *" $name "* ]] || { echo "unknown stage: $name (stages: ${STAGES[*]})" >&2; exit 2; }
done
case $MODE in
  dry) dry_run; exit $? ;;
  fetch) fetch_wheels; exit $? ;;
esac

mkdir -p "$OUT"
exec > >(tee "$OUT/campaign.log") 2>&1
TEE=$!
log "rlvrw GPU campaign: ${TOTAL}s, results to $OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || log "nvidia-smi failed"
for name in "${STAGES[@]}"; do
  run_stage "$name"
  [[ $name == setup ]] && write_env  # after the install (or without it, with --skip setup)
done
report
echo
echo "== summary ($(( $(date +%s) - START ))s of ${TOTAL}s)"
printf '%s\n' "${SUMMARY[@]}"
rm -rf "$WORK"
exec >&- 2>&-
wait "$TEE"  # the log is whole before the script returns
