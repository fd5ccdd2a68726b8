"""A throwaway Spark standalone cluster for one test session: a master and one worker from pyspark's own
distribution, on 127.0.0.1, with their logs and work folders in a temporary folder, stopped (by PID) at the end.
Java comes from the Debian packages (scripts/test.sh installs default-jre-headless where it is missing)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

# generous: a JVM starts in a few seconds on a quiet machine, many more beside a busy test run
START_DEADLINE = 300.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent


def java_available() -> bool:
    return shutil.which("java") is not None


class SparkCluster:
    # The worker offers more cores than the machine has, and each application takes at most CORES_PER_APP, so the
    # test process's driver, a Spark Connect server and a service worker's driver all run side by side.
    CORES_PER_APP = 2

    def __init__(self, folder: Path, cores: int = 6, memory: str = "4g") -> None:
        self.folder = folder
        self.cores, self.memory = cores, memory
        self.port = _free_port()
        self.url = f"spark://127.0.0.1:{self.port}"
        self.processes: list[subprocess.Popen[bytes]] = []

    def _env(self) -> dict[str, str]:
        return os.environ | {
            "SPARK_HOME": str(spark_home()), "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_LOG_DIR": str(self.folder),
            "SPARK_WORKER_DIR": str(self.folder / "work"), "SPARK_NO_DAEMONIZE": "1",
        }

    def _start(self, name: str, *args: str) -> Path:
        log = self.folder / f"{name}.log"
        with log.open("wb") as out:
            self.processes.append(subprocess.Popen(
                [str(spark_home() / "bin" / "spark-class"), *args], stdout=out, stderr=subprocess.STDOUT,
                env=self._env(), cwd=self.folder, start_new_session=True))
        return log

    def start(self) -> SparkCluster:
        self.folder.mkdir(parents=True, exist_ok=True)
        os.environ["LOMAS_SPARK_CORES_MAX"] = str(self.CORES_PER_APP)  # for the drivers of this process's workers
        master = self._start("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                             "--port", str(self.port), "--webui-port", str(_free_port()))
        self._wait(master, "Successfully started service 'sparkMaster'")
        worker = self._start("worker", "org.apache.spark.deploy.worker.Worker", self.url, "--host", "127.0.0.1",
                             "--cores", str(self.cores), "--memory", self.memory, "--webui-port", str(_free_port()))
        self._wait(worker, "Successfully registered with master")
        return self

    def start_connect(self) -> str:
        """A Spark Connect server on this cluster, on 127.0.0.1; returns its sc:// URL."""
        port = _free_port()
        jar = next((spark_home() / "jars").glob("spark-connect_*.jar"))
        log = self._start("connect", "org.apache.spark.deploy.SparkSubmit", "--master", self.url,
                          "--class", "org.apache.spark.sql.connect.service.SparkConnectServer",
                          "--conf", "spark.connect.grpc.binding.address=127.0.0.1",
                          "--conf", f"spark.connect.grpc.binding.port={port}",
                          "--conf", "spark.driver.host=127.0.0.1", "--conf", "spark.driver.bindAddress=127.0.0.1",
                          "--conf", "spark.ui.enabled=false", "--conf", "spark.sql.shuffle.partitions=2",
                          "--conf", f"spark.cores.max={self.CORES_PER_APP}",
                          "--conf", "spark.executor.memory=1g", str(jar))
        self._wait(log, "Spark Connect server started")
        return f"sc://127.0.0.1:{port}"

    def _wait(self, log: Path, line: str) -> None:
        deadline = time.monotonic() + START_DEADLINE
        while time.monotonic() < deadline:
            if line in log.read_text(errors="replace"):
                return
            if any(p.poll() is not None for p in self.processes):
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Spark did not start: {log.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        for process in reversed(self.processes):  # the worker first, then the master
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()
