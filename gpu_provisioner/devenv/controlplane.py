"""A real Kubernetes control plane (etcd + kube-apiserver) on loopback, for tests and the sandbox.

Only the kubelet (and the controllers of kube-controller-manager) are absent: the API server,
its storage, authentication (client certificates, service-account tokens), RBAC, admission and
CRD validation are the real ones.
"""

from __future__ import annotations

import base64
import ctypes
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import kubernetes
import yaml

from gpu_provisioner.devenv.tools import Toolset
from gpu_provisioner.pki import CertificateAuthority, rsa_private_key_pem
from gpu_provisioner.runtime import rest

REPO_CRDS = Path(__file__).resolve().parents[2] / "crds"
ADMIN_USER = "gpu-provisioner-admin"
_READY_TIMEOUT_S = 90.0
_STOP_GRACE_S = 15.0
# Resolved in the parent: a child between fork and exec must not touch the dynamic loader.
_prctl = ctypes.CDLL(None, use_errno=True).prctl
_PR_SET_PDEATHSIG = 1


# The process about to fork, noted before every fork: a child compares it with its parent after asking for the
# signal, since a parent that died in between sends none.
_forking_pid = 0


def _note_forking_pid() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


os.register_at_fork(before=_note_forking_pid)


def die_with_parent() -> None:
    """preexec_fn for local processes (etcd, kube-apiserver, a controller): the kernel sends them SIGTERM
    when the process that started them dies, even by SIGKILL, so nothing outlives a killed sandbox or test run.
    A child whose parent died before it could ask exits at once."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != _forking_pid:
        os._exit(1)


class ControlPlaneError(RuntimeError):
    """The control plane did not come up; the message carries the tail of the failing log."""


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port free now, for a server to bind soon. It is picked below the kernel's ephemeral range:
    a port from that range can be taken by any outgoing connection before its server binds it."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    low = max(ephemeral_low // 2, 1024)
    for _ in range(1000):
        port = random.randrange(low, ephemeral_low)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise ControlPlaneError(f"no free loopback port in {low}-{ephemeral_low - 1}")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a running process has used so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_peak_rss_mib(pid: int) -> float:
    """The most memory a running process has held resident so far, in MiB (from /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return round(next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024, 1)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class ControlPlane:
    """etcd + kube-apiserver as child processes, with generated PKI and an admin kubeconfig.

    Use as a context manager, or call start() and stop(). Everything lives in one temporary
    directory that stop() removes, unless keep_logs_in names a place to copy the logs to first.
    """

    def __init__(self, tools: Toolset, crds_dir: Path | None = REPO_CRDS,
                 audit_policy: dict[str, Any] | None = None, seats: tuple[int, int] | None = None,
                 go_gc_percent: int | None = None) -> None:
        """`audit_policy`: an audit.k8s.io/v1 Policy; the API server then logs the requests it selects to
        `audit_log`, one JSON event a line, with when each was received and answered (microseconds).
        `seats`: the requests the API server runs at once, (read-only, mutating); its priority and fairness divides
        them among priority levels and queues the rest. None: its defaults (400, 200).
        `go_gc_percent`: etcd and the API server collect garbage when their heap has grown by this much (GOGC; None:
        Go's default, 100 %): more trades memory for CPU."""
        self.tools = tools
        self.crds_dir = crds_dir
        self.audit_policy = audit_policy
        self.seats = seats
        self.go_gc_percent = go_gc_percent
        self.workdir = Path(tempfile.mkdtemp(prefix="gpu-provisioner-cp-"))
        self.log_dir = self.workdir / "logs"
        self.log_dir.mkdir()
        self.audit_log = self.log_dir / "audit.log"
        self.kubeconfig = self.workdir / "kubeconfig"
        self.server_url = ""
        self.ca = CertificateAuthority("gpu-provisioner-devenv-ca")
        self._processes: list[tuple[str, subprocess.Popen[bytes]]] = []

    # lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        try:
            etcd_url = self._start_etcd()
            self._start_apiserver(etcd_url)
            self._write_kubeconfig()
            if self.crds_dir is not None:
                self.install_crds(self.crds_dir)
        except BaseException:
            self.stop(keep_logs_in=None, remove_workdir=False)
            raise

    def stop(self, keep_logs_in: Path | None = None, remove_workdir: bool = True) -> None:
        # API server first so it does not spin on a vanished etcd.
        for _, proc in reversed(self._processes):
            _terminate(proc)
        self._processes.clear()
        if keep_logs_in is not None:
            shutil.copytree(self.log_dir, keep_logs_in, dirs_exist_ok=True)
        if remove_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds used so far by each of the control plane's processes (etcd, kube-apiserver)."""
        return {name: round(process_cpu_s(proc.pid), 2) for name, proc in self._processes}

    def peak_rss_mib(self) -> dict[str, float]:
        """The most memory each of the control plane's processes has held resident so far."""
        return {name: process_peak_rss_mib(proc.pid) for name, proc in self._processes}

    # processes -------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child process
        # A new session so the whole process group can be signalled and none is left behind.
        env = None if self.go_gc_percent is None else {**os.environ, "GOGC": str(self.go_gc_percent)}
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=die_with_parent, env=env)
        log.close()
        self._processes.append((name, proc))
        return proc

    def _start_etcd(self) -> str:
        client_port, peer_port = free_port(), free_port()
        client_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        proc = self._spawn("etcd", [
            str(self.tools.etcd),
            "--name=devenv",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=devenv={peer_url}",
            "--log-level=warn",
            # Throwaway data: skipping fsync makes the API server several times faster here.
            "--unsafe-no-fsync",
        ])
        self._wait_until(lambda: _http_ok(f"{client_url}/health"), proc, "etcd")
        return client_url

    def restart_apiserver(self, down_s: float = 0.0) -> None:
        """Kill kube-apiserver hard (as a crashed or upgraded control plane would go), keep it down for
        `down_s`, and start it again on the same address with the same keys; etcd keeps the state."""
        name, proc = next((n, p) for n, p in self._processes if n == "kube-apiserver")
        proc.kill()
        proc.wait()
        self._processes.remove((name, proc))
        time.sleep(down_s)
        self._run_apiserver()

    def _start_apiserver(self, etcd_url: str) -> None:
        pki = self.workdir / "pki"
        pki.mkdir()
        (pki / "ca.crt").write_bytes(self.ca.cert_pem)
        self.ca.issue_server("kube-apiserver", ["127.0.0.1", "localhost", "kubernetes.default.svc"]).write(
            pki, "apiserver")
        (pki / "service-account.key").write_bytes(rsa_private_key_pem())
        self.admin = self.ca.issue_client(ADMIN_USER, ["system:masters"])
        self.admin.write(pki, "admin")
        if self.audit_policy is not None:
            (pki.parent / "audit-policy.yaml").write_text(yaml.safe_dump(self.audit_policy))
        self._apiserver_port, self._etcd_url = free_port(), etcd_url
        self.server_url = f"https://127.0.0.1:{self._apiserver_port}"
        self._run_apiserver()

    def _run_apiserver(self) -> None:
        pki, port = self.workdir / "pki", self._apiserver_port
        serving_cert, serving_key = pki / "apiserver.crt", pki / "apiserver.key"
        ca_path, sa_key = pki / "ca.crt", pki / "service-account.key"
        audit = [] if self.audit_policy is None else [
            f"--audit-policy-file={self.workdir / 'audit-policy.yaml'}", f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json"]
        proc = self._spawn("kube-apiserver", [
            str(self.tools.kube_apiserver),
            f"--etcd-servers={self._etcd_url}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={pki}",
            f"--tls-cert-file={serving_cert}",
            f"--tls-private-key-file={serving_key}",
            f"--client-ca-file={ca_path}",
            f"--service-account-key-file={sa_key}",
            f"--service-account-signing-key-file={sa_key}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--api-audiences=https://kubernetes.default.svc.cluster.local",
            "--authorization-mode=Node,RBAC",
            "--service-cluster-ip-range=10.96.0.0/16",
            # No kube-controller-manager runs here, so nothing would create the `default`
            # ServiceAccount of a namespace; without this, every Pod create would be refused.
            "--disable-admission-plugins=ServiceAccount",
            "--profiling=false",
            "--v=1",
            *audit,
            *([] if self.seats is None else [f"--max-requests-inflight={self.seats[0]}",
                                             f"--max-mutating-requests-inflight={self.seats[1]}"]),
        ])
        self._wait_until(self._apiserver_ready, proc, "kube-apiserver")

    def _wait_until(self, ready: Callable[[], bool], proc: subprocess.Popen[bytes], name: str) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ControlPlaneError(
                    f"{name} exited with code {proc.returncode}:\n{_tail(self.log_dir / f'{name}.log')}"
                )
            if ready():
                return
            time.sleep(0.2)
        raise ControlPlaneError(
            f"{name} not ready after {_READY_TIMEOUT_S:.0f}s:\n{_tail(self.log_dir / f'{name}.log')}"
        )

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cadata=self.ca.cert_pem.decode())
        pki = self.workdir / "pki"
        context.load_cert_chain(pki / "admin.crt", pki / "admin.key")
        return context

    def _apiserver_ready(self) -> bool:
        return _http_ok(f"{self.server_url}/readyz", self._ssl_context())

    # clients ---------------------------------------------------------------------------------

    def _write_kubeconfig(self) -> None:
        self._write_kubeconfig_file(self.kubeconfig, ADMIN_USER, {
            "client-certificate-data": _b64(self.admin.cert_pem), "client-key-data": _b64(self.admin.key_pem)})

    def _write_kubeconfig_file(self, path: Path, user: str, credentials: dict[str, str]) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{
                "name": "devenv",
                "cluster": {"server": self.server_url, "certificate-authority-data": _b64(self.ca.cert_pem)},
            }],
            "users": [{"name": user, "user": credentials}],
            "contexts": [{"name": "devenv", "context": {"cluster": "devenv", "user": user}}],
            "current-context": "devenv",
        }
        path.touch(mode=0o600)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def kubeconfig_as(self, path: Path, user: str, groups: list[str]) -> Path:
        """A kubeconfig with a client certificate for `user` in `groups`: unlike the admin's (system:masters), its
        requests are authorized by RBAC and queued by priority and fairness, as a kubelet's (system:nodes) are."""
        pair = self.ca.issue_client(user, groups)
        return self._write_kubeconfig_file(path, user, {"client-certificate-data": _b64(pair.cert_pem),
                                                        "client-key-data": _b64(pair.key_pem)})

    def service_account_token(self, namespace: str, name: str, hours: int = 24) -> str:
        """A token of that ServiceAccount (a TokenRequest), as a pod running as it gets one."""
        with self.api_client() as client:
            return kubernetes.client.CoreV1Api(client).create_namespaced_service_account_token(name, namespace, {
                "spec": {"audiences": ["https://kubernetes.default.svc.cluster.local"],
                         "expirationSeconds": hours * 3600}}).status.token

    def service_account_kubeconfig(self, path: Path, namespace: str, name: str) -> Path:
        """A kubeconfig with a token of that ServiceAccount."""
        return self._write_kubeconfig_file(path, f"{namespace}-{name}",
                                           {"token": self.service_account_token(namespace, name)})

    def write_kubeconfig_to(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.kubeconfig, path)
        path.chmod(0o600)
        return path

    def api_client(self) -> kubernetes.client.ApiClient:
        """A `kubernetes` client authenticated as cluster admin (group system:masters)."""
        return kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))

    # CRDs ------------------------------------------------------------------------------------

    def install_crds(self, directory: Path) -> list[str]:
        with self.api_client() as client:
            return install_crds(client, directory)


def install_crds(api_client: kubernetes.client.ApiClient, directory: Path, timeout_s: float = 30.0) -> list[str]:
    """Create or update every CRD in `directory` and wait until each is Established."""
    return install_crd_files(api_client, sorted(directory.glob("*.yaml")), timeout_s)


def install_crd_files(api_client: kubernetes.client.ApiClient, paths: Iterable[Path],
                      timeout_s: float = 30.0) -> list[str]:
    """Create or update the CRDs in these manifest files and wait until each is Established."""
    api = kubernetes.client.ApiextensionsV1Api(api_client)
    names, manifests = [], []
    for path in paths:
        for manifest in yaml.safe_load_all(path.read_text()):
            if not manifest or manifest.get("kind") != "CustomResourceDefinition":
                continue
            manifests.append(manifest)
            name = manifest["metadata"]["name"]
            try:
                api.create_custom_resource_definition(manifest)
            except kubernetes.client.ApiException as error:
                if error.status != 409:
                    raise
                current = api.read_custom_resource_definition(name)
                manifest["metadata"]["resourceVersion"] = current.metadata.resource_version
                api.replace_custom_resource_definition(name, manifest)
            names.append(name)
    deadline = time.monotonic() + timeout_s
    for name in names:
        while not _crd_established(api, name):
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"CRD {name} not Established after {timeout_s:.0f}s")
            time.sleep(0.1)
    for manifest in manifests:
        _await_first_write(api_client, manifest)
    return names


def _await_first_write(api_client: kubernetes.client.ApiClient, crd: dict[str, Any]) -> None:
    """Wait until the API server takes writes of the CRD's resource. Established comes first: on kube-apiserver
    1.33 a write sent in the next two seconds or so waits that long (measured: every first create of a claim on a
    fresh control plane took 2.0 s, later ones 4 ms), which a benchmark would count as the controller's. A dry-run
    create of an empty object, refused as invalid, waits it out here."""
    spec = crd["spec"]
    version = next(v["name"] for v in spec["versions"] if v.get("served", True))
    namespace = "/namespaces/default" if spec.get("scope") == "Namespaced" else ""
    path = f"/apis/{spec['group']}/{version}{namespace}/{spec['names']['plural']}"
    empty = {"apiVersion": f"{spec['group']}/{version}", "kind": spec["names"]["kind"], "metadata": {"name": "warm-up"}}
    rest.send(api_client, "POST", path, query=[("dryRun", "All")], body=empty, timeout=30).read()


def _crd_established(api: kubernetes.client.ApiextensionsV1Api, name: str) -> bool:
    conditions = api.read_custom_resource_definition(name).status.conditions or []
    return any(c.type == "Established" and c.status == "True" for c in conditions)


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, _STOP_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            # The whole process group: a child that forked is not left behind.
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
