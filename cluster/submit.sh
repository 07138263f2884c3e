#!/usr/bin/env bash
# Submit a loop-ray training job to a running Ray cluster.
#
#   cluster/submit.sh CONFIG [--set key=value ...] [-- extra ray job submit flags]
#
# RAY_ADDRESS is the cluster's job API (default http://127.0.0.1:8265, i.e. a head on this machine or a
# port-forward to it: `ray dashboard cluster/cluster.yaml` or `kubectl port-forward svc/<head> 8265`).
# The job's entrypoint is `loop-ray train --config CONFIG`; the run folder is written on the head node
# under the config's output_dir. `ray job logs -f <id>` follows it, `ray job stop <id>` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: cluster/submit.sh CONFIG [--set key=value ...]" >&2
  exit 2
fi
config=$1; shift
if [ ! -f "$config" ]; then
  echo "cluster/submit.sh: config file not found: $config" >&2
  exit 2
fi
# validate before anything reaches the cluster: a bad key fails here, naming the key and the file
loop_ray_cli=${LOOP_RAY:-loop-ray}
"$loop_ray_cli" config show "$config" "$@" > /dev/null
exec ray job submit \
  --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" \
  --runtime-env cluster/runtime_env.yaml \
  ${RAY_JOB_SUBMIT_FLAGS:-} \
  -- loop-ray train --config "$config" "$@"
