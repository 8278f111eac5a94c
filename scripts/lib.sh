# Shared checks and defaults of the launch scripts (bash). Source it first:
#
#   . "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
#
# It sets ROOT (the repository), PYTHON (the launcher's, else .venv/bin/python, else
# python3) and DISTRIBUTED_ARGS (the launcher's, else one local node) and defines:
#
#   parse_resume ARG             RESUME=ARG (0 start, 1 resume); anything else: usage error
#   require_file PATH NAME       PATH is a file
#   require_dataset PREFIX NAME  PREFIX.bin and PREFIX.idx exist
#   require_blend BLEND NAME     every prefix of "PREFIX" or "W1 PREFIX1 W2 PREFIX2 ..." exists
#   require_checkpoint DIR NAME  DIR is one of our checkpoints (tracker or checkpoint.json)
#   require_tokenizer PATH NAME  a tokenizer.model / tokenizer.json, or a directory holding one
#   refuse_existing_run DIR NAME for resume=0: DIR holds no checkpoint yet
#   end_checks                   report every failed check at once and exit 1, if any failed
#   die MESSAGE                  report and exit 1
#   torchrun ...                 "$PYTHON" -m torch.distributed.run ...; with DRY_RUN=1 it only
#                                prints the command line (one shell-quoted word per line after
#                                "torchrun:"), so a script's launch can be checked without running it.
#                                With PLOT_SCHEDULE=FILE.png, a training launch (pretrain_maskllm.py)
#                                first draws the run's schedule with tools/plot_schedule.py from the
#                                same trainer flags (world size: --nnodes x --nproc_per_node), through
#                                run_tool; if the tool refuses, nothing is launched
#   run_tool SCRIPT ...          "$PYTHON" SCRIPT ... (a tool, or - for a program on stdin); with
#                                DRY_RUN=1 it only prints the command line as torchrun does, after
#                                "python:"
#
# NAME is the variable (or flag) the user sets to fix the path; every message names it
# and the path. The require_* functions only record failures, so a script reports all of
# them together when it calls end_checks (before its launch).

ROOT=${MEGATRON_EXT_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=$(command -v python3 || echo python3); fi
fi
# Standalone use (without run_maskllm_native.sh): one node, NPROC_PER_NODE processes.
DISTRIBUTED_ARGS=${DISTRIBUTED_ARGS:-"--nnodes ${NNODES:-1} --node_rank ${NODE_RANK:-0} --nproc_per_node ${NPROC_PER_NODE:-1} --master_addr ${MASTER_ADDR:-127.0.0.1} --master_port ${MASTER_PORT:-6000}"}
CHECK_ERRORS=()

die() {
  echo "error: $*" >&2
  exit 1
}

_check_failed() {
  CHECK_ERRORS+=("$*")
}

end_checks() {
  [ "${#CHECK_ERRORS[@]}" -gt 0 ] || return 0
  local e
  for e in "${CHECK_ERRORS[@]}"; do echo "error: $e" >&2; done
  echo "error: $(basename "$0"): ${#CHECK_ERRORS[@]} check(s) failed; nothing was launched" >&2
  exit 1
}

parse_resume() {
  case "${1:-}" in
    0|1) RESUME=$1 ;;
    "") echo "error: missing the resume flag: 0 (start from the initial checkpoint) or 1 (resume this run)" >&2; exit 2 ;;
    *) echo "error: the resume flag must be 0 (start) or 1 (resume), got '$1'" >&2; exit 2 ;;
  esac
}

require_file() {
  local path=$1 name=$2
  if [ -z "$path" ]; then _check_failed "$name is empty: set $name to a file"
  elif [ ! -f "$path" ]; then _check_failed "$name: file not found: $path (set $name=...)"; fi
}

_dataset_missing() {  # prints what PREFIX lacks ("" when complete)
  local prefix=$1 missing=""
  [ -f "$prefix.bin" ] || missing="$prefix.bin"
  [ -f "$prefix.idx" ] || missing="${missing:+$missing and }$prefix.idx"
  echo "$missing"
}

require_dataset() {
  local prefix=$1 name=$2 missing
  if [ -z "$prefix" ]; then _check_failed "$name is empty: set $name to a dataset prefix (PREFIX.bin/PREFIX.idx)"; return 0; fi
  missing=$(_dataset_missing "$prefix")
  [ -z "$missing" ] || _check_failed "$name: dataset $prefix is missing $missing (set $name=..., or build it with scripts/data/)"
}

require_blend() {
  local blend=$1 name=$2 i missing first="" count=0
  local -a items
  read -r -a items <<< "$blend"
  if [ "${#items[@]}" -eq 0 ]; then _check_failed "$name gives an empty blend: a dataset prefix or 'weight prefix' pairs"; return 0; fi
  if [ "${#items[@]}" -eq 1 ]; then require_dataset "${items[0]}" "$name"; return 0; fi
  if [ $(( ${#items[@]} % 2 )) -ne 0 ]; then
    _check_failed "$name: expected 'weight prefix' pairs, got ${#items[@]} words: $blend"; return 0
  fi
  for (( i = 0; i < ${#items[@]}; i += 2 )); do
    if ! [[ "${items[i]}" =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]]; then
      _check_failed "$name: '${items[i]}' is not a weight (expected 'weight prefix' pairs)"; return 0
    fi
    missing=$(_dataset_missing "${items[i+1]}")
    if [ -n "$missing" ]; then
      count=$(( count + 1 ))
      [ -n "$first" ] || first="dataset ${items[i+1]} is missing $missing"
    fi
  done
  [ "$count" -eq 0 ] || _check_failed "$name: $count of $(( ${#items[@]} / 2 )) datasets of the blend are missing; first: $first (set $name=..., or build them with scripts/data/)"
}

require_checkpoint() {
  local dir=$1 name=$2
  if [ -z "$dir" ]; then _check_failed "$name is empty: set $name to a checkpoint directory"
  elif [ ! -d "$dir" ]; then _check_failed "$name: checkpoint directory not found: $dir (set $name=...)"
  elif [ ! -f "$dir/latest_checkpointed_iteration.txt" ] && [ ! -f "$dir/checkpoint.json" ]; then
    _check_failed "$name: $dir is not a checkpoint (no latest_checkpointed_iteration.txt or checkpoint.json; set $name=...)"
  fi
}

require_tokenizer() {
  local path=$1 name=$2
  if [ -z "$path" ]; then
    _check_failed "$name is empty: set $name to a tokenizer.model / tokenizer.json or its directory"
  elif [ -d "$path" ]; then
    [ -f "$path/tokenizer.model" ] || [ -f "$path/tokenizer.json" ] \
      || _check_failed "$name: no tokenizer.model or tokenizer.json in $path (set $name=...)"
  elif [ ! -f "$path" ]; then
    _check_failed "$name: tokenizer not found: $path (set $name=...)"
  fi
}

refuse_existing_run() {
  local dir=$1 name=$2
  if [ -f "$dir/latest_checkpointed_iteration.txt" ]; then
    _check_failed "$name: $dir already holds a checkpoint (iteration $(cat "$dir/latest_checkpointed_iteration.txt")): pass 1 to resume it, or move it away to start over"
  fi
}

_plot_schedule() {  # torchrun's arguments -> tools/plot_schedule.py on the trainer's flags
  local nnodes=1 nproc=1 program=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --nnodes) nnodes=$2; shift 2 ;;
      --nnodes=*) nnodes=${1#*=}; shift ;;
      --nproc_per_node|--nproc-per-node) nproc=$2; shift 2 ;;
      --nproc_per_node=*|--nproc-per-node=*) nproc=${1#*=}; shift ;;
      *.py) program=$1; shift; break ;;
      *) shift ;;
    esac
  done
  if [[ "$program" != *pretrain_maskllm.py ]]; then
    echo "warning: PLOT_SCHEDULE=$PLOT_SCHEDULE: this launch runs ${program:-no program}, not the trainer; no schedule drawn" >&2
    return 0
  fi
  [[ "$nnodes" =~ ^[0-9]+$ && "$nproc" =~ ^[0-9]+$ ]] \
    || die "PLOT_SCHEDULE=$PLOT_SCHEDULE: cannot tell the world size from --nnodes $nnodes --nproc_per_node $nproc"
  run_tool "$(dirname "$program")/tools/plot_schedule.py" "$@" --world-size $(( nnodes * nproc )) -o "$PLOT_SCHEDULE" \
    || die "PLOT_SCHEDULE=$PLOT_SCHEDULE: tools/plot_schedule.py failed (above); nothing was launched"
}

torchrun() {
  [ -z "${PLOT_SCHEDULE:-}" ] || _plot_schedule "$@"
  if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "torchrun:"
    printf '%q\n' "$@"
    return 0
  fi
  "$PYTHON" -m torch.distributed.run "$@"
}

run_tool() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "python:"
    printf '%q\n' "$@"
    return 0
  fi
  "$PYTHON" "$@"
}
