"""A throwaway PostgreSQL cluster from the Debian packages: initdb in a temporary folder, listening on 127.0.0.1
(and a unix socket in that folder) only, stopped and deleted at the end. Used by the test session and by
`benchmarks/replicas.py`; `scripts/test.sh` installs the packages where they are missing."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path


def server_bin() -> Path | None:
    """The newest installed server's bin folder (Debian keeps servers out of PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresCluster:
    """`durable=False` (tests) turns fsync off; benchmarks keep the server's defaults."""

    def __init__(self, durable: bool = False) -> None:
        self.bin = server_bin()
        if self.bin is None:
            raise RuntimeError("PostgreSQL's server is not installed (Debian: apt-get install postgresql)")
        self.durable = durable
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="lomas-pg-"))
        self.data = self.folder / "data"
        # initdb refuses to run as root: the cluster then belongs to Debian's postgres user
        self.run_as = "postgres" if os.geteuid() == 0 else None
        self.user = "lomas"

    def _run(self, *args: str, timeout: float = 300) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.run_as:
            command = ["runuser", "-u", self.run_as, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=timeout)

    def start(self) -> PostgresCluster:
        if self.run_as:
            record = pwd.getpwnam(self.run_as)
            os.chown(self.folder, record.pw_uid, record.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} -c max_connections=300"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        # -w: wait until it accepts connections (a generous limit: the machine is often busy)
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.folder / "server.log"), "-w",
                  "-t", "300", "start")
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database on the cluster; returns its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "120", "stop", timeout=180)
        except (subprocess.SubprocessError, OSError):
            pid_file = self.data / "postmaster.pid"
            if pid_file.exists():  # only the server this cluster started
                os.kill(int(pid_file.read_text().split()[0]), 9)
        shutil.rmtree(self.folder, ignore_errors=True)
