"""A real single-node SLURM cluster for tests: Debian's slurmctld + slurmd + munge, started and stopped here.

Installs the packages with apt-get when they are missing, only where CI asks for it (INSTALL_SLURM=1, which
.ci/run sets) and we are root; elsewhere the tests that need it skip with the reason. Configuration follows
shared/slurm/slurm.conf.in.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator, Optional

CONF = """ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
NodeName=localhost CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def ensure_installed() -> Optional[str]:
    """None when SLURM is usable, else the reason it is not."""
    if all(os.path.exists(p) for p in ("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged")) \
            and shutil.which("sbatch"):
        return None
    if os.environ.get("INSTALL_SLURM") != "1":
        return ("SLURM is not installed (slurmctld, slurmd, munge, sbatch); INSTALL_SLURM=1, as .ci/run sets it, "
                "installs Debian's packages")
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "SLURM is not installed and cannot be installed here (needs root and apt-get)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        if subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode != 0:
            return f"could not install SLURM: {' '.join(cmd)} failed"
    return None


def _kill_pidfile(path: str) -> None:
    try:
        pid = int(open(path).read().strip())
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        pass


@contextmanager
def slurm_cluster() -> Iterator[dict]:
    """Start munged, slurmctld, slurmd; yield the environment to run sbatch/squeue with; stop them after."""
    d = tempfile.mkdtemp(prefix="slurm-")
    conf = os.path.join(d, "slurm.conf")
    with open(conf, "w") as fh:
        fh.write(CONF.format(d=d, cpus=os.cpu_count() or 2))
    for sub in ("state", "spool"):
        os.makedirs(os.path.join(d, sub))
    env = dict(os.environ, SLURM_CONF=conf)
    os.makedirs("/run/munge", exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    started_munge = subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0
    if started_munge:
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    subprocess.run(["/usr/sbin/slurmctld"], env=env, check=True)
    subprocess.run(["/usr/sbin/slurmd", "-N", "localhost"], env=env, check=True)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout
            if "idle" in out:
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"SLURM did not come up; see {d}/slurmctld.log")
        yield env
    finally:
        subprocess.run(["scancel", "--user=root"], env=env, capture_output=True)
        deadline = time.time() + 30
        while time.time() < deadline and subprocess.run(["squeue", "-h"], env=env, capture_output=True,
                                                        text=True).stdout.strip():
            time.sleep(0.5)
        _kill_pidfile(os.path.join(d, "slurmd.pid"))
        _kill_pidfile(os.path.join(d, "slurmctld.pid"))
        if started_munge:
            _kill_pidfile("/run/munge/munged.pid")


def wait_for_job(job_id: str, env: dict, timeout: float) -> str:
    """Poll until the job leaves the queue; returns its final state from scontrol (COMPLETED, FAILED...)."""
    deadline = time.time() + timeout
    state = ""
    while time.time() < deadline:
        out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
        state = next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    return f"still {state} after {timeout:.0f} s"
