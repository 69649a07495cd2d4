#!/usr/bin/env bash
# Install and start a one-node Slurm (controller + compute node on this machine) so that the tests can run the
# real vqgan.sh / diffusion.sh through sbatch. Run as root: `bash .ci/slurm/start.sh`.
# Idempotent: packages are installed once, the key is created once, daemons that already run with the same
# configuration are left alone; a changed configuration restarts them.
set -euo pipefail

if [[ $EUID -ne 0 ]]; then
    echo "start.sh: run as root (it installs packages and starts daemons)" >&2
    exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
fi

# --- munge: the authentication daemon every Slurm command talks to -------------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
fi
munge -n </dev/null | unmunge >/dev/null

# --- slurm.conf with this machine's real core and memory counts ----------------------------------------------
host=$(hostname -s)
# `slurmd -C` prints what the node really has, e.g. "NodeName=vm CPUs=2 Boards=1 ... RealMemory=24105".
node_line=$(slurmd -C | head -n 1)
cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node_line")
memory=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
hardware=${node_line#"NodeName=$host "}

install -d -o slurm -g slurm -m 0755 /var/lib/slurm /var/lib/slurm/slurmctld /var/log/slurm /run/slurm
install -d -m 0755 /var/lib/slurm/slurmd /etc/slurm

conf=$(cat <<EOF
# Written by .ci/slurm/start.sh: one node that is controller and compute node at once.
ClusterName=ci
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default per-CPU memory a job that names no --mem takes the whole node and jobs run one at a time.
DefMemPerCPU=$((memory / cpus))
# No mailer on CI machines.
MailProg=/bin/true
# A job whose dependency can never be satisfied is cancelled instead of pending forever.
DependencyParameters=kill_invalid_depend
# Finished jobs leave the controller quickly, so sbatch --wait returns promptly.
MinJobAge=5
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
NodeName=${host} NodeAddr=127.0.0.1 ${hardware} State=UNKNOWN
PartitionName=ci Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)

daemon_running() {  # daemon_running <pidfile>
    local pid
    pid=$(cat "$1" 2>/dev/null) && [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null
}

changed=1
if [[ -f /etc/slurm/slurm.conf ]] && [[ "$(cat /etc/slurm/slurm.conf)" == "$conf" ]]; then
    changed=0
fi
if ((changed)); then
    printf '%s\n' "$conf" >/etc/slurm/slurm.conf
    for pidfile in /run/slurm/slurmd.pid /run/slurm/slurmctld.pid; do
        if daemon_running "$pidfile"; then
            kill "$(cat "$pidfile")" 2>/dev/null || true
            for _ in $(seq 100); do daemon_running "$pidfile" || break; sleep 0.1; done
        fi
    done
fi

daemon_running /run/slurm/slurmctld.pid || /usr/sbin/slurmctld
daemon_running /run/slurm/slurmd.pid || /usr/sbin/slurmd

# Wait until the node accepts jobs.
for _ in $(seq 120); do
    state=$(sinfo --noheader --nodes="$host" --format=%t 2>/dev/null || true)
    case "$state" in
        idle* | mix* | alloc*) break ;;
        down* | drain*) scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.5
done
state=$(sinfo --noheader --nodes="$host" --format=%t 2>/dev/null || true)
case "$state" in
    idle* | mix* | alloc*) ;;
    *)
        echo "start.sh: node $host is '$state', not ready; see /var/log/slurm/" >&2
        exit 1
        ;;
esac
echo "slurm ready: node $host, ${cpus} CPUs, ${memory} MiB, partition ci (default)"
