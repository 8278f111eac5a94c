#!/usr/bin/env bash
# Run a megatron_ext script natively (no container).
#
#   bash run_maskllm_native.sh <script> [0|1] [extra args passed to the trainer]
#
#   0  start from the script's initial checkpoint (fresh iteration and optimizer)
#   1  resume the run's own latest checkpoint
#
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (and NPROC_PER_NODE) on every node.
set -euo pipefail

usage() { echo "usage: bash run_maskllm_native.sh <script> [0|1] [extra args]" >&2; exit 2; }
[ $# -ge 1 ] || usage
SCRIPT=$1
RESUME=${2:-0}
shift $(( $# >= 2 ? 2 : 1 ))
case "$RESUME" in 0|1) ;; *) echo "error: the resume flag must be 0 (start) or 1 (resume), got '$RESUME'" >&2; usage ;; esac
[ -f "$SCRIPT" ] || { echo "error: script not found: $SCRIPT" >&2; exit 2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export MEGATRON_EXT_ROOT=$ROOT

# --- Python environment -----------------------------------------------------------------------
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=$(command -v python3 || command -v python); fi
fi
export PYTHON
PYBIN=$(dirname "$PYTHON")
export PATH="$PYBIN:$PATH"
if ! env_report=$("$PYTHON" - <<'EOF' 2>&1
import importlib, sys
missing = []
for mod, hint in [("torch", "pip install torch"), ("megatron.core", "pip install megatron-core==0.16.1"),
                  ("megatron_ext", "pip install -e . (or: make install)"),
                  ("megatron_ext._native", "build the native module: pip install -e . (or: make install)")]:
    try:
        importlib.import_module(mod)
    except Exception as e:  # report every missing piece at once
        missing.append(f"  {mod}: {type(e).__name__}: {e}\n    -> {hint}")
if missing:
    print("the Python environment is incomplete:\n" + "\n".join(missing))
    sys.exit(1)
import torch, megatron.core
print(f"python {sys.version.split()[0]}  torch {torch.__version__}  megatron-core {megatron.core.__version__}")
print(f"cuda_devices {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
EOF
); then
  echo "error: $env_report" >&2
  echo "       python used: $PYTHON (set PYTHON=... to choose another)" >&2
  exit 1
fi
VERSIONS=$(echo "$env_report" | grep -m1 "^python ")
NGPU=$(echo "$env_report" | awk '/^cuda_devices/ {print $2}')

# --- Devices ------------------------------------------------------------------------------------
if [ "${NGPU:-0}" -gt 0 ] && [ "${MEGATRON_EXT_FORCE_CPU:-0}" != 1 ]; then
  export MEGATRON_EXT_BACKEND=nccl
  export CUDA_DEVICE_MAX_CONNECTIONS=1
  NPROC_PER_NODE=${NPROC_PER_NODE:-$NGPU}
  DEVICE_DESC="$NGPU CUDA GPU(s), NCCL"
else
  export MEGATRON_EXT_BACKEND=gloo
  export MEGATRON_EXT_FORCE_CPU=1
  NPROC_PER_NODE=${NPROC_PER_NODE:-${DEFAULT_NPROC:-2}}
  DEVICE_DESC="CPU, gloo"
fi
NCORES=$(nproc)
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  OMP_NUM_THREADS=$(( NCORES / NPROC_PER_NODE )); [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-$(( 29500 + RANDOM % 1000 ))}
export NNODES NODE_RANK MASTER_ADDR MASTER_PORT NPROC_PER_NODE RESUME
# The scripts' one torchrun line uses these.
export DISTRIBUTED_ARGS="--nnodes $NNODES --node_rank $NODE_RANK --nproc_per_node $NPROC_PER_NODE --master_addr $MASTER_ADDR --master_port $MASTER_PORT"
export WORLD_SIZE_TOTAL=$(( NNODES * NPROC_PER_NODE ))

# --- Log ----------------------------------------------------------------------------------------
NAME=$(basename "$SCRIPT" .sh)
LOG_DIR=${LOG_DIR:-$ROOT/output/logs/$NAME}
mkdir -p "$LOG_DIR"
LOG=$LOG_DIR/$(date +%Y%m%d-%H%M%S)-node$NODE_RANK.log

cat <<EOF
================ megatron_ext ================
script     $SCRIPT  (resume=$RESUME)
python     $PYTHON
versions   $VERSIONS
devices    $DEVICE_DESC
processes  $NNODES node(s) x $NPROC_PER_NODE per node (node rank $NODE_RANK, master $MASTER_ADDR:$MASTER_PORT)
threads    OMP_NUM_THREADS=$OMP_NUM_THREADS of $NCORES cores
log        $LOG
==============================================
EOF

set +e
bash "$SCRIPT" "$RESUME" "$@" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
set -e
[ "$rc" -eq 0 ] || echo "error: $SCRIPT exited with status $rc (log: $LOG)" >&2
exit "$rc"
