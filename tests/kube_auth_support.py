"""Credentials that rotate, for the gateway's and the controller's Kubernetes clients.

An ExecPlugin is a kubeconfig `exec` credential plugin (as EKS, GKE and AKS use) that the
test controls: it hands out `token` (a file), valid for `lifetime_s` when set (its
ExecCredential then says until when), or a client certificate and key (`certificate`,
saying that the certificate's end date is the credential's), and counts its runs. A
service-account directory is what the kubelet mounts in a pod: `token` and `ca.crt`.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.kube_emulator import KubeEmulator

EXEC_API = "client.authentication.k8s.io/v1"
_PLUGIN = """\
import datetime, json, pathlib, ssl, subprocess, sys
d = pathlib.Path(sys.argv[1])
lifetime, cert = d / "lifetime", d / "client.crt"
until = None
if cert.exists():
    status = {"clientCertificateData": cert.read_text(),
              "clientKeyData": (d / "client.key").read_text()}
    end = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in", str(cert)],
                         check=True, capture_output=True, text=True).stdout
    until = datetime.datetime.fromtimestamp(ssl.cert_time_to_seconds(
        end.strip().partition("=")[2]), datetime.timezone.utc)
else:
    status = {"token": (d / "token").read_text()}
    if lifetime.exists():
        until = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
            seconds=float(lifetime.read_text()))
if until is not None:
    status["expirationTimestamp"] = until.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
with open(d / "runs", "a") as f:
    f.write("run\\n")
print(json.dumps({"apiVersion": "API", "kind": "ExecCredential", "status": status}))
"""


def write_atomically(path: Path, text: str) -> None:
    """As the kubelet updates a mounted Secret or token: never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ExecPlugin:
    def __init__(self, directory: Path, token: str = "", lifetime_s: float | None = None,
                 certificate: tuple[Path, Path] | None = None) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.script = directory / "plugin.py"
        self.script.write_text(_PLUGIN.replace("API", EXEC_API))
        self.token = token
        if certificate is not None:
            self.certificate = certificate
        if lifetime_s is not None:
            (directory / "lifetime").write_text(str(lifetime_s))

    @property
    def token(self) -> str:
        return (self.directory / "token").read_text()

    @token.setter
    def token(self, value: str) -> None:
        write_atomically(self.directory / "token", value)

    @property
    def certificate(self) -> tuple[Path, Path]:
        return self.directory / "client.crt", self.directory / "client.key"

    @certificate.setter
    def certificate(self, files: tuple[Path, Path]) -> None:
        """Hand out this certificate and key from the next run on, instead of the token."""
        for source, target in zip(files, self.certificate, strict=True):
            write_atomically(target, source.read_text())

    @property
    def runs(self) -> int:
        path = self.directory / "runs"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def user(self) -> dict[str, Any]:
        """The kubeconfig `user` that runs this plugin."""
        return {"exec": {"apiVersion": EXEC_API, "command": sys.executable,
                         "args": ["-I", "-S", str(self.script), str(self.directory)],
                         "interactiveMode": "Never"}}


def exec_kubeconfig(emu: KubeEmulator, path: Path, plugin: ExecPlugin,
                    context: str = "emulator") -> Path:
    """emu.kubeconfig() with its user's credentials from `plugin`."""
    return user_kubeconfig(emu, path, plugin.user(), context)


def user_kubeconfig(emu: KubeEmulator, path: Path, user: dict[str, Any],
                    context: str = "emulator") -> Path:
    """emu.kubeconfig() with `user` as its user's entry."""
    doc = yaml.safe_load(emu.kubeconfig(path, context).read_text())
    doc["users"][0]["user"] = user
    path.write_text(yaml.safe_dump(doc))
    return path


def use_exec_plugin(kubeconfig: Path, context: str, plugin: ExecPlugin) -> None:
    """In a kubeconfig of several contexts, `context`'s user runs `plugin`."""
    doc = yaml.safe_load(kubeconfig.read_text())
    user = next(c["context"]["user"] for c in doc["contexts"] if c["name"] == context)
    for entry in doc["users"]:
        if entry["name"] == user:
            entry["user"] = plugin.user()
    kubeconfig.write_text(yaml.safe_dump(doc))


def service_account(directory: Path, emu: KubeEmulator, token: str) -> Path:
    """A pod's service-account mount for a tls=True emulator."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(emu.ca_file, directory / "ca.crt")
    write_atomically(directory / "token", token)
    return directory
