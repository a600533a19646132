"""
The key material that secures the path from exoproxy to its instance, and the TLS
policy that checks the instance with it.

For each new instance exoproxy generates an EC P-256 key, a self-signed certificate
for `SERVICE_NAME` and a bearer secret. The user-data hands all three to the TLS
terminator on the instance. exoproxy then trusts that one certificate, and no
certificate authority, for the instance's address, and sends the secret with every
request over that verified connection.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.logger import Logger

if TYPE_CHECKING:
    from exoproxy.backend_agent import BackendTLSPolicy

log = Logger()

#: The name in the instance certificate's subjectAltName, and the host name that
#: exoproxy verifies. The agent connects to the instance's IP address, so this name
#: never needs to resolve.
SERVICE_NAME = "ollama.exoproxy.internal"

#: Validity of an instance certificate. A stopped and restarted instance keeps its
#: certificate, so the certificate outlives any one run. Rotating it means creating a
#: new instance.
CERTIFICATE_LIFETIME = datetime.timedelta(days=3650)

# Subdirectory of the state directory that contains one material file per instance
# name.
_MATERIAL_DIRECTORY = "backend-tls"
_MATERIAL_FORMAT = 1


class MaterialError(Exception):
    """
    The key material for the managed instance is missing, unreadable or belongs to
    another instance.
    """


@attrs.frozen
class BackendMaterial:
    """
    The key, certificate and bearer secret of one instance's TLS terminator.

    Attributes:
        certificate_pem: The self-signed certificate, in PEM.
        private_key_pem: The certificate's PKCS#8 private key, in PEM.
        bearer_token: The secret that every request to the instance carries.
        created_at: When the material was generated, in seconds since the epoch.
        instance_id: The instance that boots with this material, once it is known.
    """

    certificate_pem: str
    private_key_pem: str = attrs.field(repr=False)
    bearer_token: str = attrs.field(repr=False)
    created_at: float
    instance_id: str | None = None

    @property
    def fingerprint(self) -> str:
        """
        The SHA-256 fingerprint of the certificate, as colon-separated hex.
        """
        return certificate_fingerprint(self.certificate_pem.encode("ascii"))


def certificate_fingerprint(certificate_pem: bytes) -> str:
    """
    Return the SHA-256 fingerprint of a PEM certificate, as colon-separated hex.
    """
    certificate = x509.load_pem_x509_certificate(certificate_pem)
    digest = certificate.fingerprint(hashes.SHA256())
    return digest.hex(":")


def generate_material(now: float) -> BackendMaterial:
    """
    Generate a new key, a self-signed certificate for `SERVICE_NAME` and a bearer
    secret.

    Args:
        now: The current time in seconds since the epoch. The certificate is valid
            from an hour before it, to allow for clock skew on the instance.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "exoproxy"),
            x509.NameAttribute(NameOID.COMMON_NAME, SERVICE_NAME),
        ]
    )
    start = datetime.datetime.fromtimestamp(now, tz=datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - datetime.timedelta(hours=1))
        .not_valid_after(start + CERTIFICATE_LIFETIME)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(SERVICE_NAME)]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )

    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return BackendMaterial(
        certificate_pem=certificate.public_bytes(serialization.Encoding.PEM).decode(
            "ascii"
        ),
        private_key_pem=key_pem.decode("ascii"),
        bearer_token=secrets.token_urlsafe(32),
        created_at=now,
    )


def default_state_dir(environ: Mapping[str, str], home: Path | None = None) -> Path:
    """
    Return the state directory to use when none is configured.

    The order is systemd's `$STATE_DIRECTORY` (its first entry), then
    `/var/lib/exoproxy` when this process may create or write it, then
    `$XDG_STATE_HOME/exoproxy`, which defaults to `~/.local/state/exoproxy`.
    """
    systemd = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if systemd:
        return Path(systemd)

    system = Path("/var/lib/exoproxy")
    existing = system if system.exists() else system.parent
    if os.access(existing, os.W_OK | os.X_OK):
        return system

    home = home if home is not None else Path.home()
    state_home = environ.get("XDG_STATE_HOME") or str(home / ".local" / "state")
    return Path(state_home) / "exoproxy"


class MaterialStore:
    """
    Material files in a private directory, one for each instance name.

    The directory is created with mode 0700 and each file with mode 0600, written
    to a temporary file and renamed, so a crash never leaves half a file behind.
    """

    def __init__(self, state_dir: Path) -> None:
        self.directory = Path(state_dir) / _MATERIAL_DIRECTORY

    def _path(self, instance_name: str) -> Path:
        # Quoting maps any instance name to one file name without a path separator.
        return self.directory / f"instance-{quote(instance_name, safe='')}.json"

    def _ensure_directory(self) -> None:
        self.directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)

    def prepare(self) -> None:
        """
        Create the directory, so that a state directory that cannot be written
        stops the daemon at startup instead of failing the first cold start.

        Raises:
            MaterialError: The directory cannot be created or written.
        """
        try:
            self._ensure_directory()
            if not os.access(self.directory, os.W_OK | os.X_OK):
                raise PermissionError(13, "not writable")
        except OSError as error:
            raise MaterialError(
                f"--state-dir: cannot keep key material in {self.directory}: "
                f"{error.strerror or error}; give a writable directory"
            ) from None

    def save(self, instance_name: str, material: BackendMaterial) -> None:
        """
        Write the material of an instance name, replacing any earlier material.

        Raises:
            OSError: The directory or the file cannot be written.
        """
        self._ensure_directory()
        document = {
            "format": _MATERIAL_FORMAT,
            "instance_id": material.instance_id,
            "created_at": material.created_at,
            "certificate": material.certificate_pem,
            "private_key": material.private_key_pem,
            "bearer_token": material.bearer_token,
        }
        path = self._path(instance_name)
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "w") as file:
                json.dump(document, file, indent=2)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def load(self, instance_name: str) -> BackendMaterial | None:
        """
        Read the material of an instance name, or return None when there is none.

        Raises:
            MaterialError: The file exists but cannot be read or parsed. The message
                names the file but never its content.
        """
        path = self._path(instance_name)
        try:
            document = json.loads(path.read_text())
            return BackendMaterial(
                certificate_pem=document["certificate"],
                private_key_pem=document["private_key"],
                bearer_token=document["bearer_token"],
                created_at=float(document["created_at"]),
                instance_id=document["instance_id"],
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise MaterialError(
                f"cannot read the key material in {path}: {type(error).__name__}"
            ) from None


class BackendKeyring:
    """
    The material of the one instance that a daemon manages, on disk and in the
    TLS policy.
    """

    def __init__(
        self,
        store: MaterialStore,
        policy: BackendTLSPolicy,
        instance_name: str,
        clock: Any,
    ) -> None:
        self._store = store
        self._policy = policy
        self._instance_name = instance_name
        self._clock = clock

    def new_material(self) -> BackendMaterial:
        """
        Generate and store the material for an instance that is about to be
        created. It replaces the material of the earlier instance of this name.
        """
        material = generate_material(self._clock.seconds())
        self._store.save(self._instance_name, material)
        log.info(
            "Generated new key material for instance {name}: certificate "
            "{fingerprint}",
            name=self._instance_name,
            fingerprint=material.fingerprint,
        )
        return material

    def bind(self, instance_id: str, material: BackendMaterial) -> BackendMaterial:
        """
        Record that the instance `instance_id` boots with `material`.
        """
        bound = attrs.evolve(material, instance_id=instance_id)
        self._store.save(self._instance_name, bound)
        return bound

    def material_for(self, instance_id: str) -> BackendMaterial:
        """
        Return the stored material of an instance.

        Raises:
            MaterialError: The state directory has no material for this instance.
        """
        material = self._store.load(self._instance_name)
        if material is None:
            raise MaterialError(
                f"no key material for instance {instance_id} in "
                f"{self._store.directory}; exoproxy cannot verify it. Delete the "
                "instance so that exoproxy creates a new one with new material, "
                "or restore the state directory"
            )
        if material.instance_id is None:
            # The daemon stopped after it created the instance and before it
            # recorded the id, so the stored material is the one of that creation.
            log.info(
                "Assigning the key material of the last creation to instance "
                "{instance_id}",
                instance_id=instance_id,
            )
            material = self.bind(instance_id, material)
        if material.instance_id != instance_id:
            raise MaterialError(
                f"the key material in {self._store.directory} belongs to instance "
                f"{material.instance_id}, not {instance_id}; delete instance "
                f"{instance_id} so that exoproxy creates a new one"
            )
        return material

    def backend_url(self, instance_id: str, address: str, port: int) -> str:
        """
        Pin the instance's certificate and secret to its address, and return the
        HTTPS URL of its terminator.

        Raises:
            MaterialError: The state directory has no material for this instance.
        """
        material = self.material_for(instance_id)
        self._policy.pin(address, port, material)
        host = f"[{address}]" if ":" in address else address
        return f"https://{host}:{port}"


__all__ = [
    "SERVICE_NAME",
    "BackendKeyring",
    "BackendMaterial",
    "MaterialError",
    "MaterialStore",
    "default_state_dir",
    "generate_material",
]
