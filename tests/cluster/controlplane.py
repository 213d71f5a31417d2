"""A real Kubernetes control plane on 127.0.0.1, started the way envtest starts one.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler are the binaries
``controlplane/build.sh`` builds from the Go module proxy into the per-machine cache. This module:

- makes a CA, the API server's serving certificate and a client certificate per identity
  (admin in ``system:masters``, ``system:kube-controller-manager``, ``system:kube-scheduler``)
  with Python's ``cryptography``, plus the service-account signing key pair;
- starts the four processes, each in its own session with ``PR_SET_PDEATHSIG`` (the same
  no-orphan guard as ``kubetune local``), logs under ``<workdir>/logs/``;
- runs the API server with ``--authorization-mode=RBAC`` and the default admission chain
  (ServiceAccount included), so tokens, RBAC and admission are the real thing;
- waits for ``/readyz`` and writes an admin kubeconfig;
- mints ServiceAccount tokens through the TokenRequest API (:meth:`ControlPlane.token`) and
  writes kubeconfigs that authenticate with them (:meth:`ControlPlane.kubeconfig_for`).

``ControlPlane.stop()`` stops everything, SIGTERM then SIGKILL per process group.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kubetune.local.containers import free_port
from kubetune.local.processes import die_with_parent, group_alive
from tests.kubeconfig import write_kubeconfig

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "tests" / "cluster" / "controlplane" / "build.sh"
SERVICE_CIDR = "10.0.0.0/24"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"


def build_binaries() -> Path:
    """The cache folder with the binaries, building them first if this machine has none.

    ``KUBETUNE_CONTROLPLANE_BIN`` names a folder to use as it is (a packaged build).
    """
    given = os.environ.get("KUBETUNE_CONTROLPLANE_BIN")
    if given:
        return Path(given)
    out = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True
    ).stdout
    return Path(out.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------------------------


def _pem_key(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


@dataclass
class Pki:
    """A CA and the certificates signed by it, written as PEM files into ``folder``."""

    folder: Path
    ca_key: Any = None
    ca_cert: Any = None

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(_name("kubetune-test-ca"))
            .issuer_name(_name("kubetune-test-ca"))
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca_path.write_bytes(self.ca_cert.public_bytes(serialization.Encoding.PEM))

    @property
    def ca_path(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def ca_key_path(self) -> Path:
        path = self.folder / "ca.key"
        if not path.exists():
            path.write_bytes(_pem_key(self.ca_key))
        return path

    def issue(
        self,
        stem: str,
        cn: str,
        org: str | None = None,
        *,
        server_names: tuple[str, ...] = (),
        server_ips: tuple[str, ...] = (),
    ) -> tuple[Path, Path]:
        """A leaf certificate (client, or server when names/IPs are given): (cert, key) paths."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        server = bool(server_names or server_ips)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn, org))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            sans: list[x509.GeneralName] = [x509.DNSName(n) for n in server_names]
            sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.ca_key, hashes.SHA256())
        cert_path, key_path = self.folder / f"{stem}.crt", self.folder / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem_key(key))
        key_path.chmod(0o600)
        return cert_path, key_path

    def service_account_keys(self) -> tuple[Path, Path]:
        """The RSA key pair that signs ServiceAccount tokens: (private, public) paths."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private, public = self.folder / "sa.key", self.folder / "sa.pub"
        private.write_bytes(_pem_key(key))
        public.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return private, public


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


@dataclass
class Component:
    """One control-plane process."""

    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # SIGKILL, not SIGTERM: a kube-apiserver whose etcd is already gone hangs in
                # its graceful shutdown and outlived a killed test run (seen here).
                preexec_fn=die_with_parent(signal.SIGKILL),
            )

    def check(self) -> None:
        """Raise with the log's tail if the process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid
        if self.proc.poll() is None:
            os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait()
        if group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)


def _client_flags(kubeconfig: Path) -> list[str]:
    """What the controller-manager and the scheduler share: who they are, where they serve."""
    return [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={free_port()}",
    ]


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler on loopback."""

    workdir: Path
    bin_dir: Path = field(default_factory=build_binaries)
    components: list[Component] = field(default_factory=list)
    port: int = 0
    startup_seconds: float = 0.0

    # --- start ------------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> ControlPlane:
        began = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pki = Pki(self.workdir / "pki")
        self.port = free_port()
        etcd_port, etcd_peer = free_port(), free_port()
        self.server = f"https://127.0.0.1:{self.port}"

        serving = self.pki.issue(
            "apiserver",
            "kube-apiserver",
            server_names=(
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
            ),
            server_ips=("127.0.0.1", "10.0.0.1"),
        )
        self.admin_cert = self.pki.issue("admin", "kubetune-test-admin", "system:masters")
        kcm_cert = self.pki.issue("kcm", "system:kube-controller-manager")
        sched_cert = self.pki.issue("scheduler", "system:kube-scheduler")
        sa_private, sa_public = self.pki.service_account_keys()
        ca = self.pki.ca_path

        self.kubeconfig = write_kubeconfig(
            self.workdir / "admin.kubeconfig",
            self.server,
            ca,
            cert=self.admin_cert[0],
            key=self.admin_cert[1],
        )
        kcm_config = write_kubeconfig(
            self.workdir / "kcm.kubeconfig",
            self.server,
            ca,
            cert=kcm_cert[0],
            key=kcm_cert[1],
            user="kcm",
        )
        sched_config = write_kubeconfig(
            self.workdir / "scheduler.kubeconfig",
            self.server,
            ca,
            cert=sched_cert[0],
            key=sched_cert[1],
            user="scheduler",
        )
        logs = self.workdir / "logs"
        # Every request, at Metadata level: tests read who was denied what (audit_events()).
        self.audit_log = logs / "audit.log"
        audit_policy = self.workdir / "audit-policy.yaml"
        audit_policy.write_text(
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\n"
            "rules:\n  - level: Metadata\n"
        )
        etcd_data = self.workdir / "etcd"
        etcd = Component(
            "etcd",
            [
                str(self.bin_dir / "etcd"),
                f"--data-dir={etcd_data}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-cluster=default=http://127.0.0.1:{etcd_peer}",
                "--unsafe-no-fsync",  # a test cluster: speed over durability
                "--log-level=warn",
            ],
            logs / "etcd.log",
        )
        apiserver = Component(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                f"--tls-cert-file={serving[0]}",
                f"--tls-private-key-file={serving[1]}",
                f"--client-ca-file={ca}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={sa_public}",
                f"--service-account-signing-key-file={sa_private}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--audit-policy-file={audit_policy}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-maxsize=0",
                "--profiling=false",
                "--v=1",
            ],
            logs / "kube-apiserver.log",
        )
        controller_manager = Component(
            "kube-controller-manager",
            [
                str(self.bin_dir / "kube-controller-manager"),
                *_client_flags(kcm_config),
                f"--service-account-private-key-file={sa_private}",
                f"--root-ca-file={ca}",
                f"--cluster-signing-cert-file={ca}",
                f"--cluster-signing-key-file={self.pki.ca_key_path}",
                "--use-service-account-credentials=true",
                "--leader-elect=false",
                # The GC and the Job, Deployment, ReplicaSet, namespace and SA controllers are
                # what the tests need; all defaults stay on, as in a cluster.
                "--controllers=*",
                "--concurrent-gc-syncs=5",
                "--profiling=false",
                "--v=1",
            ],
            logs / "kube-controller-manager.log",
        )
        scheduler = Component(
            "kube-scheduler",
            [
                str(self.bin_dir / "kube-scheduler"),
                *_client_flags(sched_config),
                "--leader-elect=false",
                "--profiling=false",
                "--v=1",
            ],
            logs / "kube-scheduler.log",
        )
        self.components = [etcd, apiserver, controller_manager, scheduler]
        try:
            etcd.start()
            apiserver.start()
            self._wait_until(
                lambda: self.request("GET", "/readyz")[0] == 200,
                "/readyz",
                time.monotonic() + timeout,
            )
            controller_manager.start()
            scheduler.start()
            # The controller-manager is working once it has created the default ServiceAccount.
            self._wait_until(
                lambda: self.get("/api/v1/namespaces/default/serviceaccounts/default") is not None,
                "the default ServiceAccount (kube-controller-manager running)",
                time.monotonic() + timeout,
            )
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_path))
        ctx.load_cert_chain(str(self.admin_cert[0]), str(self.admin_cert[1]))
        return ctx

    def _wait_until(self, probe: Any, what: str, deadline: float) -> None:
        while True:
            for component in self.components:
                component.check()
            try:
                if probe():
                    return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"control plane: no {what} in time (logs: {self.workdir / 'logs'})"
                )
            time.sleep(0.2)

    # --- plain admin requests (fixtures and setup; tests use KubeClient or kubectl) -----------

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, context=self._ssl(), timeout=30) as resp:
                text = resp.read().decode()
                status = resp.status
        except urllib.error.HTTPError as exc:
            text = exc.read().decode()
            status = exc.code
        try:
            return status, json.loads(text) if text else None
        except ValueError:
            return status, text

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        if status == 404:
            return None
        if status >= 300:
            raise RuntimeError(f"GET {path}: {status} {body}")
        return body

    def create(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        status, body = self.request("POST", path, obj)
        if status >= 300 and status != 409:
            raise RuntimeError(f"POST {path}: {status} {body}")
        return body

    # --- identities -------------------------------------------------------------------------

    def token(self, namespace: str, service_account: str, seconds: int = 3600) -> str:
        """A token for a ServiceAccount from the TokenRequest API (as a projected volume gets)."""
        status, body = self.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": seconds},
            },
        )
        if status >= 300:
            raise RuntimeError(f"TokenRequest for {namespace}/{service_account}: {status} {body}")
        return str(body["status"]["token"])

    def kubeconfig_for(
        self, namespace: str, service_account: str, path: Path | None = None
    ) -> Path:
        """A kubeconfig that authenticates as the ServiceAccount (the real authorizer decides)."""
        path = path or self.workdir / f"sa-{namespace}-{service_account}.kubeconfig"
        return write_kubeconfig(
            path,
            self.server,
            self.pki.ca_path,
            token=self.token(namespace, service_account),
            namespace=namespace,
            user=f"{namespace}-{service_account}",
        )

    def audit_events(
        self, user: str | None = None, code: int | None = None
    ) -> list[dict[str, Any]]:
        """The API server's audit events (ResponseComplete), optionally of one user and code."""
        out = []
        if not self.audit_log.exists():
            return out
        for line in self.audit_log.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if user is not None and event.get("user", {}).get("username") != user:
                continue
            if code is not None and (event.get("responseStatus") or {}).get("code") != code:
                continue
            out.append(event)
        return out

    # --- stop -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every component, newest first; no process outlives this call."""
        for component in reversed(self.components):
            component.stop()

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.components if c.proc is not None]
