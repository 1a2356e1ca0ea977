#!/bin/bash
# jaxscale under Open MPI's mpirun: one JAX process per MPI rank.
#
#   HOSTS=node1,node2 GPUS_PER_HOST=8 launch/mpirun.sh --config=configs/quickstart.py --workdir=/shared/runs/q
#
# PROCESSES_PER_HOST=1 (the default): one process per host driving all GPUS_PER_HOST GPUs.
# PROCESSES_PER_HOST=$GPUS_PER_HOST: one process per GPU (rank r on a host drives its GPU r).
# Rank 0 runs on the first host and hosts JAX's coordinator at $HOSTS[0]:$PORT (default 61234),
# which every rank is told through JAX_COORDINATOR_ADDRESS; that works with Open MPI 4 and 5.
# Other variables (PYTHON, JAXSCALE_INIT_TIMEOUT_S, JAXSCALE_HEARTBEAT_TIMEOUT_S) are passed on.
set -euo pipefail

if [[ $# -eq 0 || -z ${HOSTS:-} ]]; then
  echo "usage: HOSTS=host1,host2 [GPUS_PER_HOST=8] [PROCESSES_PER_HOST=1] [PORT=61234]" \
       "$0 --config=FILE --workdir=DIR [--config.key=value ...]" >&2
  exit 2
fi
per_host=${PROCESSES_PER_HOST:-1}
gpus=${GPUS_PER_HOST:-8}
IFS=, read -r -a hosts <<< "$HOSTS"
host_slots=$(printf "%s:$per_host," "${hosts[@]}")

exports=(-x "JAX_COORDINATOR_ADDRESS=${hosts[0]}:${PORT:-61234}")
if [[ $per_host == 1 && $gpus -gt 1 ]]; then
  exports+=(-x "JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))")
fi
for name in JAXSCALE_INIT_TIMEOUT_S JAXSCALE_HEARTBEAT_TIMEOUT_S PATH LD_LIBRARY_PATH; do
  if [[ -n ${!name:-} ]]; then exports+=(-x "$name"); fi
done

# --map-by slot fills each host before the next, so rank 0 is on ${hosts[0]}.
exec mpirun -np $((${#hosts[@]} * per_host)) --host "${host_slots%,}" --map-by slot \
  "${exports[@]}" "${PYTHON:-python}" -m jaxscale.train "$@"
