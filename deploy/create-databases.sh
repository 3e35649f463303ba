#!/usr/bin/env bash
# Create the lab's three PostgreSQL databases (if missing): the MLflow tracking store, the Optuna
# storage the workers share, and the basic-auth users. They are separate because MLflow and
# Optuna each keep their schema version in an `alembic_version` table.
#
# Connection: the usual libpq variables, defaulting to this machine's server as `postgres`
# (PGHOST=127.0.0.1 PGPORT=5432 PGUSER=postgres; PGPASSWORD or ~/.pgpass for a password).
set -euo pipefail
export PGHOST="${PGHOST:-127.0.0.1}" PGPORT="${PGPORT:-5432}" PGUSER="${PGUSER:-postgres}"

for db in epsstar_mlflow epsstar_optuna epsstar_auth; do
  if [[ "$(psql -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" != 1 ]]; then
    psql -d postgres -qc "CREATE DATABASE $db"
    echo "created database $db"
  fi
done
