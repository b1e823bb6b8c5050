"""A one-node SLURM cluster on localhost for tests: munged, slurmctld and slurmd (Debian's
`slurm-wlm` + `munge`), all state under one temporary folder.

    cluster = LocalSlurm(folder); cluster.start()   # exports SLURM_CONF; sbatch/squeue/srun work
    ...
    cluster.stop()

`unavailable()` says why the cluster cannot run here (None when it can): the programs are missing
or this is not root (slurmd must run as root to start jobs as the submitting user).
Only the processes started here are stopped (by their pid files).
"""
import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Optional

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "srun", "scancel")
INSTALL = "apt-get install -y slurm-wlm munge"


def unavailable() -> Optional[str]:
  missing = [p for p in PROGRAMS if shutil.which(p) is None]
  if missing:
    return f"no local SLURM: {', '.join(missing)} not found (install with `{INSTALL}`)"
  if os.geteuid() != 0:
    return "no local SLURM: slurmd must run as root to start jobs, and this is not root"
  return None


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _slurm_conf(folder: str, node: str, cpus: int, munge_socket: str) -> str:
  return "\n".join([
      "ClusterName=vitnormtest",
      f"SlurmctldHost={node}(127.0.0.1)",
      f"SlurmctldPort={_free_port()}",
      f"SlurmdPort={_free_port()}",
      "SlurmUser=root",
      "SlurmdUser=root",
      "AuthType=auth/munge",
      "CredType=cred/munge",
      # cred_expire also delays a requeued job's restart (default 120 s).
      f"AuthInfo=socket={munge_socket},cred_expire=5",
      f"StateSaveLocation={folder}/state",
      f"SlurmdSpoolDir={folder}/spool",
      f"SlurmctldPidFile={folder}/slurmctld.pid",
      f"SlurmdPidFile={folder}/slurmd.pid",
      f"SlurmctldLogFile={folder}/slurmctld.log",
      f"SlurmdLogFile={folder}/slurmd.log",
      "ProctrackType=proctrack/linuxproc",
      "TaskPlugin=task/none",
      "SelectType=select/cons_tres",
      "SelectTypeParameters=CR_CPU",
      "MpiDefault=none",
      "SwitchType=switch/none",
      "JobAcctGatherType=jobacct_gather/none",
      "AccountingStorageType=accounting_storage/none",
      "JobCompType=jobcomp/none",
      "ReturnToService=2",
      "SchedulerType=sched/backfill",
      "SchedulerParameters=sched_interval=1,bf_interval=1",
      "MinJobAge=3600",  # finished jobs stay visible to squeue (there is no accounting database)
      "KillWait=30",  # SIGTERM to SIGKILL: the trainer saves its checkpoint in between
      "JobRequeue=1",
      "SlurmctldDebug=info",
      "SlurmdDebug=info",
      f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
      f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP",
      "",
  ])


class LocalSlurm:
  """A one-node cluster named after `hostname -s`, with `cpus` CPUs, its files under `folder`."""

  def __init__(self, folder: str, cpus: int = 2):
    self.folder = os.path.abspath(folder)
    self.cpus = cpus
    self.node = socket.gethostname().split(".")[0]
    self.conf = os.path.join(self.folder, "slurm.conf")
    self.munge_socket = os.path.join(self.folder, "munge", "munge.socket")
    self.env = None

  def _run(self, *cmd):
    subprocess.run(cmd, check=True, env=self.env, capture_output=True, timeout=60)

  def start(self, timeout: float = 60) -> "LocalSlurm":
    for sub in ("munge", "state", "spool"):
      os.makedirs(os.path.join(self.folder, sub), mode=0o700, exist_ok=True)
    os.chmod(self.folder, 0o755)
    key = os.path.join(self.folder, "munge", "munge.key")
    with open(key, "wb") as f:
      f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    with open(self.conf, "w", encoding="utf-8") as f:
      f.write(_slurm_conf(self.folder, self.node, self.cpus, self.munge_socket))
    self.env = dict(os.environ, SLURM_CONF=self.conf)
    munge_dir = os.path.join(self.folder, "munge")
    self._run("munged", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
              f"--log-file={munge_dir}/munged.log", f"--pid-file={munge_dir}/munged.pid",
              f"--seed-file={munge_dir}/munged.seed")
    self._run("slurmctld", "-c", "-f", self.conf)  # -c: a clean start, no earlier state
    self._run("slurmd", "-f", self.conf, "-N", self.node)
    deadline = time.time() + timeout
    while True:
      out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
      if out.returncode == 0 and out.stdout.strip() in ("idle", "mixed", "allocated"):
        return self
      if time.time() > deadline:
        raise RuntimeError(f"local SLURM did not come up in {timeout:.0f} s: sinfo says "
                           f"{(out.stdout + out.stderr).strip()!r}; logs in {self.folder}")
      time.sleep(0.5)

  def stop(self) -> None:
    """Cancels every job, then stops slurmd, slurmctld and munged (by their pid files)."""
    if self.env is not None:
      subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True, timeout=60)
      time.sleep(1)
    for pid_file in ("slurmd.pid", "slurmctld.pid", os.path.join("munge", "munged.pid")):
      path = os.path.join(self.folder, pid_file)
      try:
        with open(path, encoding="utf-8") as f:
          pid = int(f.read().strip())
        os.kill(pid, signal.SIGTERM)
      except (OSError, ValueError):
        continue
      for _ in range(100):
        try:
          os.kill(pid, 0)
        except OSError:
          break
        time.sleep(0.1)
