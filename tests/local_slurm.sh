#!/usr/bin/env bash
# A one-node SLURM on this machine, to run the workflow through profiles/slurm for real
# (tests/test_workflow.py::test_quick_workflow_on_slurm). Needs root and Debian's packages:
#   apt-get install -y slurmctld slurmd slurm-client munge
# Usage: bash tests/local_slurm.sh start | stop
# Two fake GPUs (GRES backed by plain files) let jobs ask for --gpus=1 on a CPU machine;
# MinJobAge=600 keeps finished jobs visible to squeue (the profile's status command without
# accounting). Everything runs as root; state lives under /var/spool/slurm*.
set -euo pipefail
host=$(hostname -s)
cpus=$(nproc)
conf=/etc/slurm/slurm.conf

running() {  # a daemon from its pid file (pgrep would also match zombies)
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

start() {
    mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
    chown munge:munge /run/munge
    running /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged
    cat > "$conf" <<EOF
ClusterName=semibench-local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
GresTypes=gpu
NodeName=$host CPUs=$cpus RealMemory=64000 Gres=gpu:2 State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    touch /var/spool/slurmd/fakegpu0 /var/spool/slurmd/fakegpu1
    echo "NodeName=$host Name=gpu File=/var/spool/slurmd/fakegpu[0-1]" > /etc/slurm/gres.conf
    running /run/slurmctld.pid || /usr/sbin/slurmctld
    running /run/slurmd.pid || /usr/sbin/slurmd
    for _ in $(seq 30); do
        # a drain left over from an earlier configuration would keep the node out
        timeout 5 scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
        if timeout 5 sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            sinfo
            exit 0
        fi
        sleep 1
    done
    echo "local SLURM did not come up; see /var/log/slurm/" >&2
    exit 1
}

stop() {
    timeout 10 scontrol shutdown 2>/dev/null || true
    if running /run/munge/munged.pid; then kill "$(cat /run/munge/munged.pid)"; fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
