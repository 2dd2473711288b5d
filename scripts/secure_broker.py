"""A Kafka broker run as managed Kafka is, for the security tests: TLS, SASL, mutual TLS and an
authorizer that denies what no ACL allows, with certificates made here by openssl.

Listeners: PLAINTEXT (the tests' own admin client: a super user, as a cluster operator is),
SASL_SSL (SCRAM-SHA-512 and PLAIN users), MTLS (SSL with client certificates required; the
principal is the certificate's ``CN=…``) and OTHERHOST (SSL with a certificate for another host
name, for the hostname check). The worker's principals get only the ACLs a test grants.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from kafka import KafkaAdminClient
from kafka.admin import (
    ACL,
    ACLOperation,
    ACLPermissionType,
    ACLResourcePatternType,
    ResourcePattern,
    ResourceType,
)

from scripts.kafka_broker import Broker, BrokerError

SCRAM_USER, SCRAM_PASSWORD = "worker", "scram-secret-7d41c0"
PLAIN_USER, PLAIN_PASSWORD = "plainworker", "plain-secret-2b9e55"
MTLS_PRINCIPAL = "User:CN=worker-mtls"
KEY_PASSPHRASE = "key-pass-5e13aa"
STORE_PASSWORD = "store-pass"


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BrokerError(f"openssl {args[0]} failed: {proc.stderr}")


class Certificates:
    """A CA, the broker's certificates (for 127.0.0.1 and localhost, and one for another host),
    a client certificate with a plain and an encrypted key, and a second CA that signed none
    of them. PEM files for clients, PKCS12 keystores for the broker."""

    def __init__(self, where: Path) -> None:
        self.dir = where
        where.mkdir(parents=True, exist_ok=True)
        self.ca = where / "ca.pem"
        self.other_ca = where / "other-ca.pem"
        self.client_cert = where / "client.pem"
        self.client_key = where / "client.key"
        self.client_key_encrypted = where / "client-encrypted.key"
        self.keystore = where / "broker.p12"
        self.other_host_keystore = where / "other-host.p12"

    def make(self) -> Certificates:
        d = self.dir
        for ca in ("ca", "other-ca"):
            _openssl(
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-subj", f"/CN=purge-worker test {ca}", "-keyout", f"{ca}.key",
                "-out", f"{ca}.pem", cwd=d,
            )  # fmt: skip
        self._signed("broker", "/CN=localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost")
        self._signed("other-host", "/CN=other.example", "subjectAltName=DNS:other.example")
        self._signed("client", "/CN=worker-mtls", "extendedKeyUsage=clientAuth")
        for name in ("broker", "other-host"):
            _openssl(
                "pkcs12", "-export", "-in", f"{name}.pem", "-inkey", f"{name}.key",
                "-out", f"{name}.p12", "-passout", f"pass:{STORE_PASSWORD}", cwd=d,
            )  # fmt: skip
        _openssl(
            "pkey", "-in", "client.key", "-aes256", "-passout", f"pass:{KEY_PASSPHRASE}",
            "-out", "client-encrypted.key", cwd=d,
        )  # fmt: skip
        return self

    def _signed(self, name: str, subject: str, extension: str) -> None:
        d = self.dir
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
            "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d,
        )  # fmt: skip
        (d / f"{name}.ext").write_text(extension + "\n")
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
            cwd=d,
        )  # fmt: skip


class SecureBroker(Broker):
    def __init__(self) -> None:
        super().__init__()
        self.certs = Certificates(self.workdir / "certs")

    def extra_listeners(self) -> dict[str, str]:
        return {"SASL_SSL": "SASL_SSL", "MTLS": "SSL", "OTHERHOST": "SSL"}

    def extra_properties(self) -> str:
        c = self.certs
        store = f"ssl.keystore.type=PKCS12\nssl.keystore.password={STORE_PASSWORD}\n"
        jaas = "org.apache.kafka.common.security"
        return f"""
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:ANONYMOUS
sasl.enabled.mechanisms=SCRAM-SHA-512,PLAIN
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config={jaas}.scram.ScramLoginModule required;
listener.name.sasl_ssl.plain.sasl.jaas.config={jaas}.plain.PlainLoginModule required user_{PLAIN_USER}="{PLAIN_PASSWORD}";
ssl.keystore.location={c.keystore}
{store}listener.name.mtls.ssl.client.auth=required
listener.name.mtls.ssl.truststore.type=PEM
listener.name.mtls.ssl.truststore.location={c.ca}
listener.name.otherhost.ssl.keystore.location={c.other_host_keystore}
listener.name.otherhost.ssl.keystore.type=PKCS12
listener.name.otherhost.ssl.keystore.password={STORE_PASSWORD}
"""  # noqa: E501

    def format_arguments(self) -> list[str]:
        return ["--add-scram", f"SCRAM-SHA-512=[name={SCRAM_USER},password={SCRAM_PASSWORD}]"]

    def start(self) -> SecureBroker:
        self.certs.make()
        super().start()
        return self

    def address(self, listener: str) -> str:
        return f"127.0.0.1:{self.ports[listener]}"

    def admin(self) -> KafkaAdminClient:
        return KafkaAdminClient(bootstrap_servers=self.bootstrap)

    def grant(
        self,
        principal: str,
        resource: ResourceType,
        name: str,
        *operations: ACLOperation,
    ) -> None:
        """Allow ``principal`` ``operations`` on one topic or group, as an operator would."""
        pattern = ResourcePattern(resource, name, ACLResourcePatternType.LITERAL)
        acls = [ACL(principal, "*", op, ACLPermissionType.ALLOW, pattern) for op in operations]
        admin = self.admin()
        try:
            result = admin.create_acls(acls)
        finally:
            admin.close()
        if result.get("failed"):
            raise BrokerError(f"could not grant {operations} on {name}: {result['failed']}")

    def denials(self, principal: str) -> list[str]:
        """The broker's log lines saying it denied ``principal`` an operation."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [line for line in lines if f"Principal = {principal} is Denied" in line]
