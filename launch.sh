#!/usr/bin/env bash
# Entry point for every run of this project.
#
#   ./launch.sh demo                      set up the environment, run the demo
#   ./launch.sh test [pytest args]        set up the environment, run the test suite (not the slow tests)
#   ./launch.sh lint                      set up, lint (ruff check, ruff format --check)
#   ./launch.sh test-latest [pytest args] the suite against the newest versions pyproject.toml allows,
#                                         in a separate ./.venv-latest (no constraints.txt)
#   ./launch.sh sft +recipe=NAME [k=v..]  torchrun -m mixtral_tune.sft on this node (or several: see below)
#   ./launch.sh dpo +recipe=NAME [k=v..]  torchrun -m mixtral_tune.dpo
#   ./launch.sh kto|orpo|cpo +recipe=NAME  torchrun -m mixtral_tune.kto (.orpo, .cpo; SimPO: cpo +recipe=tiny/simpo)
#
# Set-up installs into the active virtualenv, or creates ./.venv. torch is installed first and
# pinned (TORCH_SPEC, default torch==2.13.0; set TORCH_INDEX_URL for a specific wheel index) so
# that no other requirement pulls a multi-GB build nobody asked for. Everything else is installed at
# the exact versions of constraints.txt (the last green suite); MIXTRAL_TUNE_UNPINNED=1 installs
# whatever pyproject.toml's ranges resolve to instead. The installed torch stays as it is either way.
#
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (SLURM's SLURM_NNODES, SLURM_NODEID and
# the first host of SLURM_JOB_NODELIST are used when present); several nodes meet at torchrun's c10d
# rendezvous on MASTER_ADDR:MASTER_PORT (RDZV_ID, default SLURM_JOB_ID, names the job). NPROC overrides the processes per
# node (default: the number of GPUs, or 1 without GPUs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

install_torch() {
  if ! python -c "import torch" 2>/dev/null; then
    local index_args=()
    [[ -n "${TORCH_INDEX_URL:-}" ]] && index_args=(--index-url "$TORCH_INDEX_URL")
    python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" "${index_args[@]}"
  fi
}

# A constraints file holding the installed torch's release, so no install below replaces it (pip
# accepts a local build such as 2.13.0+cpu or +cu130 for it); with `pinned`, constraints.txt's other
# lines too.
write_constraints() {
  local file=$1 mode=$2
  echo "torch==$(python -c 'import torch; print(torch.__version__.split("+")[0])')" >"$file"
  if [[ "$mode" == pinned ]]; then
    grep -v '^torch==' constraints.txt >>"$file"
  fi
}

setup_env() {
  if [[ -z "${VIRTUAL_ENV:-}" ]]; then
    [[ -d .venv ]] || python3 -m venv .venv
    # shellcheck disable=SC1091
    source .venv/bin/activate
  fi
  install_torch
  local constraints
  constraints=$(mktemp)
  if [[ "${MIXTRAL_TUNE_UNPINNED:-0}" == 1 ]]; then
    write_constraints "$constraints" unpinned
  else
    write_constraints "$constraints" pinned
  fi
  python -m pip install -q -c "$constraints" -e ".[dev]"
  rm -f "$constraints"
}

# ./.venv-latest, always (whatever virtualenv is active): torch as set-up installs it, everything
# else upgraded to the newest release pyproject.toml's ranges allow.
setup_latest_env() {
  [[ -d .venv-latest ]] || python3 -m venv .venv-latest
  # shellcheck disable=SC1091
  source .venv-latest/bin/activate
  install_torch
  local constraints
  constraints=$(mktemp)
  write_constraints "$constraints" unpinned
  python -m pip install -q --upgrade --upgrade-strategy eager -c "$constraints" -e ".[dev]"
  rm -f "$constraints"
  python -m pip freeze --exclude-editable | grep -v '^nvidia-'
}

gpu_count() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --list-gpus 2>/dev/null | wc -l
  else
    echo 0
  fi
}

slurm_master() {
  # the first host of the job's node list; no pipe into head (under pipefail, scontrol killed by SIGPIPE
  # after head has read its line would stop this script)
  local hosts
  hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null) || true
  echo "${hosts%%$'\n'*}"
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
  if [[ "$nnodes" == 1 ]]; then
    exec torchrun --nnodes 1 --node_rank 0 --nproc_per_node "$nproc" \
      --master_addr "$master_addr" --master_port "$master_port" -m "$module" "$@"
  fi
  # Several nodes meet at torchrun's c10d rendezvous on MASTER_ADDR:MASTER_PORT: the node with that
  # address hosts the store, or joins a store already listening there. The rendezvous numbers the
  # nodes in order of arrival (NODE_RANK is passed on; c10d does not use it).
  exec torchrun --nnodes "$nnodes" --node_rank "$node_rank" --nproc_per_node "$nproc" \
    --rdzv-backend c10d --rdzv-endpoint "$master_addr:$master_port" \
    --rdzv-id "${RDZV_ID:-${SLURM_JOB_ID:-mixtral-tune}}" -m "$module" "$@"
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
  lint)
    setup_env
    ruff check .
    exec ruff format --check .
    ;;
  test-latest)
    setup_latest_env
    exec python -m pytest -q -m "not slow" "$@"
    ;;
  sft | dpo | kto | orpo | cpo)
    [[ -n "${VIRTUAL_ENV:-}" || ! -d .venv ]] || source .venv/bin/activate
    run_torchrun "mixtral_tune.${command}" "$@"
    ;;
  *)
    echo "usage: ./launch.sh demo | test [pytest args] | lint | test-latest [pytest args] | sft|dpo|kto|orpo|cpo +recipe=NAME [overrides]" >&2
    exit 2
    ;;
esac
