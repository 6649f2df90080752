#!/usr/bin/env bash
# Entry point for every run of this project.
#
#   ./launch.sh demo                      set up the environment, run the demo
#   ./launch.sh test [pytest args]        set up the environment, run the test suite
#   ./launch.sh sft +recipe=NAME [k=v..]  torchrun -m mixtral_tune.sft on this node (or several: see below)
#   ./launch.sh dpo +recipe=NAME [k=v..]  torchrun -m mixtral_tune.dpo
#   ./launch.sh kto|orpo|cpo +recipe=NAME  torchrun -m mixtral_tune.kto (.orpo, .cpo; SimPO: cpo +recipe=tiny/simpo)
#
# Set-up installs into the active virtualenv, or creates ./.venv. torch is installed first and
# pinned (TORCH_SPEC, default torch==2.13.0; set TORCH_INDEX_URL for a specific wheel index) so
# that no other requirement pulls a multi-GB build nobody asked for.
#
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (SLURM's SLURM_NNODES, SLURM_NODEID and
# the first host of SLURM_JOB_NODELIST are used when present). NPROC overrides the processes per
# node (default: the number of GPUs, or 1 without GPUs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

setup_env() {
  if [[ -z "${VIRTUAL_ENV:-}" ]]; then
    [[ -d .venv ]] || python3 -m venv .venv
    # shellcheck disable=SC1091
    source .venv/bin/activate
  fi
  if ! python -c "import torch" 2>/dev/null; then
    local index_args=()
    [[ -n "${TORCH_INDEX_URL:-}" ]] && index_args=(--index-url "$TORCH_INDEX_URL")
    python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" "${index_args[@]}"
  fi
  python -m pip install -q -e ".[dev]"
}

gpu_count() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --list-gpus 2>/dev/null | wc -l
  else
    echo 0
  fi
}

slurm_master() {
  scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1
}

run_torchrun() {
  local module=$1
  shift
  local gpus
  gpus=$(gpu_count)
  local nproc=${NPROC:-$((gpus > 0 ? gpus : 1))}
  local nnodes=${NNODES:-${SLURM_NNODES:-1}}
  local node_rank=${NODE_RANK:-${SLURM_NODEID:-0}}
  local master_addr=${MASTER_ADDR:-}
  if [[ -z "$master_addr" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
    master_addr=$(slurm_master)
  fi
  master_addr=${master_addr:-127.0.0.1}
  local master_port=${MASTER_PORT:-29500}
  exec torchrun --nnodes "$nnodes" --node_rank "$node_rank" --nproc_per_node "$nproc" \
    --master_addr "$master_addr" --master_port "$master_port" -m "$module" "$@"
}

command=${1:-}
[[ $# -gt 0 ]] && shift
case "$command" in
  demo)
    setup_env
    exec python -m mixtral_tune.demo "$@"
    ;;
  test)
    setup_env
    exec python -m pytest -q -m "not slow" "$@"
    ;;
  sft | dpo | kto | orpo | cpo)
    [[ -n "${VIRTUAL_ENV:-}" || ! -d .venv ]] || source .venv/bin/activate
    run_torchrun "mixtral_tune.${command}" "$@"
    ;;
  *)
    echo "usage: ./launch.sh demo | test [pytest args] | sft|dpo|kto|orpo|cpo +recipe=NAME [overrides]" >&2
    exit 2
    ;;
esac
