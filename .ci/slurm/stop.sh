#!/usr/bin/env bash
# Stop the one-node Slurm and munge that .ci/slurm/start.sh started (by their pid files). Run as root.
set -euo pipefail
for pidfile in /run/slurm/slurmd.pid /run/slurm/slurmctld.pid /run/munge/munged.pid; do
    pid=$(cat "$pidfile" 2>/dev/null) || continue
    if [[ -n $pid ]] && kill "$pid" 2>/dev/null; then
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
done
echo "slurm stopped"
