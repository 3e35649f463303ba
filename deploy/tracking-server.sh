#!/usr/bin/env bash
# The lab's MLflow tracking server: runs, params and metrics in PostgreSQL, artifacts
# (checkpoints, reports, models) stored and served by the server itself, users and permissions by
# MLflow's basic-auth app. Run deploy/create-databases.sh once first.
#
#   export MLFLOW_FLASK_SERVER_SECRET_KEY=<long random string, the same at every restart>
#   export MLFLOW_AUTH_ADMIN_PASSWORD=<first start only: the `admin` user's password, >= 12 chars>
#   deploy/tracking-server.sh
#
# Settings (environment variables; the defaults serve this machine's loopback only):
#   EPSSTAR_BACKEND_URI     postgresql+psycopg2://postgres@127.0.0.1:5432/epsstar_mlflow
#   EPSSTAR_ARTIFACTS       ./mlartifacts   (a directory, or s3://bucket/prefix, gs://...)
#   EPSSTAR_HOST            127.0.0.1       (0.0.0.0 serves the lab network: set the next one too)
#   EPSSTAR_ALLOWED_HOSTS   e.g. mlflow.lab.example.org,10.0.0.5:5000 (Host headers accepted)
#   EPSSTAR_PORT            5000
#   EPSSTAR_SERVER_WORKERS  2               (HTTP worker processes)
#   MLFLOW_AUTH_CONFIG_PATH deploy/basic_auth.ini (where users and permissions live)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set it to a long random string, kept across restarts}"
export MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-$here/basic_auth.ini}"
# The GenAI job runner (about eight extra processes) serves nothing epsstar uses.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

# postgresql+psycopg2: SQLAlchemy 2.1 reads a bare postgresql:// as the psycopg 3 driver.
args=(
  --backend-store-uri "${EPSSTAR_BACKEND_URI:-postgresql+psycopg2://postgres@127.0.0.1:5432/epsstar_mlflow}"
  --artifacts-destination "${EPSSTAR_ARTIFACTS:-$PWD/mlartifacts}"
  --serve-artifacts
  --host "${EPSSTAR_HOST:-127.0.0.1}"
  --port "${EPSSTAR_PORT:-5000}"
  --workers "${EPSSTAR_SERVER_WORKERS:-2}"
  --app-name basic-auth
)
if [[ -n "${EPSSTAR_ALLOWED_HOSTS:-}" ]]; then
  args+=(--allowed-hosts "$EPSSTAR_ALLOWED_HOSTS")
fi
# exec: the server replaces this shell, so stopping this process stops the server.
exec mlflow server "${args[@]}"
