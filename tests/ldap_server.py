"""A real OpenLDAP server (Debian's ``slapd``) on loopback for the directory login tests:
its own configuration, database and certificate (a test CA from trustme), on free ports,
with ``ldap://`` (StartTLS offered) and ``ldaps://`` listeners. Nothing is installed as a
service and nothing outside the test's directory is written."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

SLAPD = Path("/usr/sbin/slapd")
SUFFIX = "dc=hospital,dc=example"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PW = "root-secret"
PEOPLE = f"ou=people,{SUFFIX}"
GROUPS = f"ou=groups,{SUFFIX}"

#: ``pytestmark = needs_slapd`` in a module whose tests use the server
needs_slapd = pytest.mark.skipif(
    not SLAPD.exists(), reason="Debian slapd is not installed (make test installs it)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Slapd:
    """slapd serving ``dc=hospital,dc=example`` from ``directory``; :attr:`ca_file` is
    the CA that signed its certificate (for 127.0.0.1 and localhost)."""

    def __init__(self, directory: Path) -> None:
        import trustme

        self.dir = directory
        (directory / "db").mkdir(parents=True)
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file = directory / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        cert.private_key_pem.write_to_path(str(directory / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
        schema = "/etc/ldap/schema"
        (directory / "slapd.conf").write_text(
            "\n".join(
                [
                    *(f"include {schema}/{s}.schema" for s in ("core", "cosine", "inetorgperson", "nis")),
                    "modulepath /usr/lib/ldap",
                    "moduleload back_mdb",
                    f"pidfile {directory}/slapd.pid",
                    f"TLSCACertificateFile {self.ca_file}",
                    f"TLSCertificateFile {directory}/cert.pem",
                    f"TLSCertificateKeyFile {directory}/key.pem",
                    "database mdb",
                    "maxsize 10485760",
                    f'suffix "{SUFFIX}"',
                    f'rootdn "{ROOT_DN}"',
                    f"rootpw {ROOT_PW}",
                    f"directory {directory}/db",
                    "access to attrs=userPassword by anonymous auth by self write by * none",
                    "access to * by users read by * none",
                    "",
                ]
            )
        )  # fmt: skip
        self.port, self.tls_port = _free_port(), _free_port()
        self.url = f"ldap://127.0.0.1:{self.port}"
        self.tls_url = f"ldaps://127.0.0.1:{self.tls_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()
        with self.admin() as c:
            c.add(SUFFIX, ["dcObject", "organization"], {"o": "County General", "dc": "hospital"})
            c.add(PEOPLE, ["organizationalUnit"], {"ou": "people"})
            c.add(GROUPS, ["organizationalUnit"], {"ou": "groups"})

    def start(self) -> None:
        log = (self.dir / "slapd.log").open("ab")
        # -d keeps it in the foreground, so the test owns the process
        self.proc = subprocess.Popen(
            [str(SLAPD), "-f", str(self.dir / "slapd.conf"), "-d", "0",
             "-h", f"{self.url}/ {self.tls_url}/"],
            stdout=log, stderr=log,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError((self.dir / "slapd.log").read_text()) from None
                time.sleep(0.05)
        raise RuntimeError("slapd did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def admin(self) -> Any:
        import ldap3

        return ldap3.Connection(
            ldap3.Server("127.0.0.1", port=self.port), ROOT_DN, ROOT_PW, auto_bind=True
        )

    def add_person(self, uid: str, password: str, ou: str = PEOPLE, **attrs: str) -> str:
        dn = f"uid={uid},{ou}"
        with self.admin() as c:
            ok = c.add(dn, ["inetOrgPerson"], {"cn": uid, "sn": uid, "uid": uid,
                                                "userPassword": password, **attrs})  # fmt: skip
            assert ok, c.result
        return dn

    def set_password(self, dn: str, password: str) -> None:
        import ldap3

        with self.admin() as c:
            assert c.modify(dn, {"userPassword": [(ldap3.MODIFY_REPLACE, [password])]}), c.result

    def add_group(self, cn: str, *members: str) -> str:
        dn = f"cn={cn},{GROUPS}"
        with self.admin() as c:
            assert c.add(dn, ["groupOfNames"], {"cn": cn, "member": list(members)}), c.result
        return dn

    def remove_member(self, group: str, member: str) -> None:
        import ldap3

        with self.admin() as c:
            assert c.modify(group, {"member": [(ldap3.MODIFY_DELETE, [member])]}), c.result
