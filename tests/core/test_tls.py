"""DICOM TLS (``[dicom.tls] enabled``): dcmtk storescu +tls with a client certificate
from the configured CA is accepted; plain TCP and unknown certificates are not."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from sqlalchemy import func, select

from pipeline.archive import Archive
from pipeline.config import Settings
from pipeline.dicom.receiver import start_receiver
from pipeline.index.db import migrate, session_scope
from pipeline.index.schema import Instance
from tests.core.conftest import HOST, require_tool, statuses, storescu

pytestmark = pytest.mark.slow  # a TLS receiver and dcmtk peers


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run([require_tool("openssl"), *args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _issue(name: str, folder: Path, ca: str | None) -> None:
    """``name``.key/.pem: a P-256 key and a certificate signed by ``ca`` (or self-signed)."""
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key"]
    if ca is None:
        _openssl("req", "-x509", *key, "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}", cwd=folder)
        return
    _openssl("req", *key, "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
    (folder / f"{name}.ext").write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        cwd=folder,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    _issue("ca", folder, None)
    _issue("server", folder, "ca")
    _issue("modality", folder, "ca")
    _issue("stranger", folder, None)  # self-signed: not from our CA
    return folder


def tls_receiver_settings(pki: Path, data_dir: Path, **dicom: object) -> Settings:
    """A receiver on an ephemeral loopback port that requires TLS with a client
    certificate from the ``pki`` fixture's CA; ``dicom`` adds to its ``[dicom]``."""
    return Settings(
        storage={"data_dir": data_dir},
        dicom={
            "bind": HOST,
            "port": 0,
            "allowed_aes": ["*"],
            "tls": {
                "enabled": True,
                "cert_file": pki / "server.pem",
                "key_file": pki / "server.key",
                "ca_file": pki / "ca.pem",
                "require_client_cert": True,
            },
            **dicom,
        },
    )


def modality_tls(pki: Path) -> tuple[str, ...]:
    """dcmtk's arguments for TLS with the modality's certificate from the ``pki`` fixture."""
    return ("+tls", str(pki / "modality.key"), str(pki / "modality.pem"), "+cf", str(pki / "ca.pem"))


def test_tls_with_client_certificates(pki: Path, tmp_path: Path, study_files: list[Path]) -> None:
    settings = tls_receiver_settings(pki, tmp_path / "data")
    migrate(settings.index_url)
    archive = Archive(settings)
    server = start_receiver(settings, archive)
    port = int(server.server_address[1])
    try:
        good = storescu(port, *study_files[:3], extra=modality_tls(pki))
        assert good.returncode == 0, good.stdout + good.stderr
        assert statuses(good) == [0, 0, 0]

        plain = storescu(port, study_files[3])
        assert plain.returncode != 0 and statuses(plain) == []

        stranger = storescu(
            port,
            study_files[4],
            extra=("+tls", str(pki / "stranger.key"), str(pki / "stranger.pem"), "+cf", str(pki / "ca.pem")),
        )
        assert stranger.returncode != 0 and statuses(stranger) == []

        with session_scope(archive.session_factory, readonly=True) as session:
            assert session.scalar(select(func.count(Instance.id))) == 3
        # the server is still up after the refused handshakes
        again = storescu(port, study_files[5], extra=modality_tls(pki))
        assert statuses(again) == [0]
    finally:
        server.shutdown()
        archive.engine.dispose()


def test_tls_misconfiguration_is_a_clear_error(tmp_path: Path) -> None:
    from pipeline.dicom.receiver import ssl_context
    from pipeline.errors import ConfigError

    settings = Settings(dicom={"tls": {"enabled": True}})
    with pytest.raises(ConfigError, match="cert_file"):
        ssl_context(settings)
    missing = Settings(
        dicom={
            "tls": {
                "enabled": True,
                "cert_file": tmp_path / "no.pem",
                "key_file": tmp_path / "no.key",
                "ca_file": tmp_path / "no-ca.pem",
            }
        }
    )
    with pytest.raises(ConfigError, match="cannot load"):
        ssl_context(missing)
