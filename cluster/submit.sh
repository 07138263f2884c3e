#!/usr/bin/env bash
# Submit a loop-ray training job to a running Ray cluster.
#
#   cluster/submit.sh CONFIG [--set key=value ...]
#
# RAY_ADDRESS is the cluster's job API (default http://127.0.0.1:8265, i.e. a head on this machine or a
# port-forward to it: `ray dashboard cluster/cluster.yaml` or `kubectl port-forward svc/<head> 8265`).
# Token authentication (Ray 2.60's default when the head has a token): `ray job ...` sends the token
# only with RAY_AUTH_MODE=token set, and reads it from RAY_AUTH_TOKEN, the file named by
# RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token (`ray get-auth-token` on the head prints it).
# RAY_JOB_SUBMIT_FLAGS adds flags to `ray job submit` (e.g. "--no-wait --submission-id my-run");
# PYTHON is the interpreter that validates the config locally (default: python).
#
# The job's entrypoint is `python -m loop_ray.cli train --config CONFIG [--set ...]`, started in the
# uploaded working_dir, so the code that runs is this checkout as uploaded and the nodes need only
# loop-ray's dependencies (a `loop-ray` console script exists only where loop-ray is pip-installed).
# The run folder is written on the head node under the config's output_dir; a relative output_dir
# lands inside the unpacked working_dir in Ray's session folder, so give an absolute one
# (`--set output_dir=/data/runs`). `ray job logs -f <id>` follows the job, `ray job stop <id>` stops it.
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
# validate before anything reaches the cluster, with the code about to be uploaded: a bad key fails
# here, naming the key and the file
"${PYTHON:-python}" -m loop_ray.cli config show "$config" "$@" > /dev/null
# shellcheck disable=SC2086  # RAY_JOB_SUBMIT_FLAGS is a list of flags
exec ray job submit \
  --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" \
  --runtime-env cluster/runtime_env.yaml \
  ${RAY_JOB_SUBMIT_FLAGS:-} \
  -- python -m loop_ray.cli train --config "$config" "$@"
