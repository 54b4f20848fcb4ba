"""A real single-node SLURM cluster for the grid tests, on the loopback host, everything under a temp dir.

The session fixture :func:`slurm_cluster` starts ``munged``, ``slurmctld`` and ``slurmd`` (Debian's
``munge``, ``slurmctld``, ``slurmd``, ``slurm-client``; ``make slurm`` installs them as root) with a
generated munge key and a minimal ``slurm.conf`` (loopback addresses, free ports, state and spool
dirs in the temp dir, ``proctrack/linuxproc``, ``task/none``, ``select/cons_tres``), waits for
``sinfo`` to show the node idle, points ``SLURM_CONF`` at it for the session and stops everything
afterwards. Where SLURM cannot run (not root, no binaries, daemons that do not come up) the tests
that use it are skipped with the reason; nothing else depends on it.

``python -m tests.slurm_cluster`` starts the cluster, prints ``sinfo`` and stops it (a manual check).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from contextlib import closing
from pathlib import Path

import pytest

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scancel", "scontrol")
PARTITION = "grid"
START_TIMEOUT_S = 60


class SlurmUnavailable(RuntimeError):
    """SLURM cannot run here; the message says why (used as the skip reason)."""


def _find(name: str) -> str | None:
    return shutil.which(name) or next((p for d in ("/usr/sbin", "/usr/bin", "/sbin")
                                       if os.access(p := f"{d}/{name}", os.X_OK)), None)


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    """The node's memory as slurmd sees it, less a margin so the node is never drained for it."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return max(256, int(line.split()[1]) // 1024 - 512)
    return 1024


def slurm_conf(root: Path, munge_socket: Path) -> str:
    """A minimal slurm.conf: one node (the real CPUs and memory) at 127.0.0.1, one partition."""
    return "\n".join([
        "ClusterName=cmmgrid", "SlurmctldHost=localhost(127.0.0.1)",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
        "MpiDefault=none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "ReturnToService=2",
        "SlurmdParameters=config_overrides", "SchedulerType=sched/backfill",
        "SlurmctldTimeout=30", "SlurmdTimeout=30", "InactiveLimit=0", "KillWait=5", "MinJobAge=300",
        f"NodeName=localhost NodeAddr=127.0.0.1 NodeHostname=localhost CPUs={os.cpu_count()} "
        f"RealMemory={_memory_mb()} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


class SlurmCluster:
    """The daemons of one throwaway cluster under ``root``; :meth:`start` then :meth:`stop`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.partition = PARTITION
        self.procs: list[subprocess.Popen] = []

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _spawn(self, *argv: str, log: str) -> None:
        out = open(self.root / log, "ab")
        self.procs.append(subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))

    def start(self) -> "SlurmCluster":
        """Write the key and config, start the three daemons, wait until the node is idle."""
        if os.geteuid() != 0:
            raise SlurmUnavailable("not root: slurmd and munged need root here (run the tests as root)")
        missing = [d for d in DAEMONS if _find(d) is None]
        if missing:
            raise SlurmUnavailable(f"SLURM binaries missing: {missing} (make slurm installs them as root on Debian)")
        for sub in ("state", "spool", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key, sock = self.root / "munge" / "munge.key", self.root / "munge" / "munge.socket"
        subprocess.run([_find("mungekey"), "-c", "-f", "-k", str(key)], check=True, capture_output=True)
        os.chmod(key, 0o600)
        self.conf.write_text(slurm_conf(self.root, sock))
        self._spawn(_find("munged"), "-F", "-f", f"--key-file={key}", f"--socket={sock}",
                    f"--pid-file={self.root}/munge/munged.pid", f"--log-file={self.root}/munge/munged.log",
                    f"--seed-file={self.root}/munge/munged.seed", log="munged.out")
        self._wait(lambda: sock.exists(), "munged did not create its socket", "munge/munged.log")
        self._spawn(_find("slurmctld"), "-D", "-i", "-f", str(self.conf), log="slurmctld.out")
        self._spawn(_find("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf), log="slurmd.out")
        self._wait(self.node_idle, "the node never showed idle in sinfo", "slurmctld.log", "slurmd.log")
        return self

    def node_idle(self) -> bool:
        out = subprocess.run([_find("sinfo"), "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def _wait(self, ready, what: str, *logs: str) -> None:
        deadline = time.time() + START_TIMEOUT_S
        while time.time() < deadline:
            if ready():
                return
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                break
            time.sleep(0.5)
        tails = "\n".join(f"--- {log}:\n" + "\n".join((self.root / log).read_text(errors="replace").splitlines()[-15:])
                          for log in logs + ("slurmctld.out", "slurmd.out") if (self.root / log).exists())
        self.stop()
        raise SlurmUnavailable(f"{what} within {START_TIMEOUT_S}s (exited: {dead})\n{tails}")

    def stop(self) -> None:
        """Cancel what is left, then stop the daemons started here (by their pids), newest first."""
        if self.conf.exists() and _find("scancel"):
            subprocess.run([_find("scancel"), "--full", "-p", self.partition], env=self.env, capture_output=True)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs = []


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """The running cluster with ``SLURM_CONF`` exported for the session; skips with the reason where it cannot run."""
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except (SlurmUnavailable, OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"no SLURM cluster: {err}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        cluster.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        c = SlurmCluster(Path(tmp)).start()
        try:
            print(subprocess.run(["sinfo"], env=c.env, capture_output=True, text=True).stdout)
        finally:
            c.stop()
