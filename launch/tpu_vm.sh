#!/bin/bash
# jaxscale on a Cloud TPU VM pod slice: the same command on every worker at once.
#
#   launch/tpu_vm.sh TPU_NAME ZONE --config=configs/quickstart.py --workdir=gs://bucket/runs/q
#
# Each worker runs `python -m jaxscale.train ARGS` in $JAXSCALE_DIR (default ~/jaxscale, where
# the repository is checked out and `pip install -e .` was run on every worker; see
# launch/README.md). JAXSCALE_DISTRIBUTED=jax lets JAX's own TPU detection find the workers and
# the coordinator (worker 0). Optional: PROJECT (gcloud --project), PYTHON (default python3),
# JAXSCALE_INIT_TIMEOUT_S, JAXSCALE_HEARTBEAT_TIMEOUT_S (passed on when set).
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE --config=FILE --workdir=DIR [--config.key=value ...]" >&2
  exit 2
fi
tpu=$1 zone=$2
shift 2

env_vars="JAXSCALE_DISTRIBUTED=jax"
for name in JAXSCALE_INIT_TIMEOUT_S JAXSCALE_HEARTBEAT_TIMEOUT_S; do
  if [[ -n ${!name:-} ]]; then env_vars+=" $name=$(printf %q "${!name}")"; fi
done
# The remote shell parses this line once: every argument is quoted for it.
remote="cd ${JAXSCALE_DIR:-~/jaxscale} && $env_vars ${PYTHON:-python3} -m jaxscale.train"
remote+=$(printf " %q" "$@")

project=()
if [[ -n ${PROJECT:-} ]]; then project=(--project="$PROJECT"); fi
exec gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" "${project[@]}" --worker=all \
  --command="$remote"
