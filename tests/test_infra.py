"""Embedded NATS and Mooncake master: loopback only, and nothing left running after stop."""

import asyncio
from pathlib import Path

import nats
import pytest
from epd.core.config import Settings
from epd.ops.infra import MooncakeMaster, NatsServer
from epd.ops.processes import port_open

pytestmark = pytest.mark.integration


def listening(pid: int) -> set[str]:
    """Local addresses a process listens on, from /proc (no extra tools)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = str(fd.readlink()) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    addrs = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                host = cols[1].split(":")[0]
                addrs.add("127.0.0.1" if host == "0100007F" else host)
    return addrs


def test_nats_and_master_listen_on_loopback_and_stop_cleanly(tmp_path: Path) -> None:
    nats = NatsServer(tmp_path / "nats").start()
    master = MooncakeMaster(tmp_path / "mc").start()
    try:
        assert listening(nats.proc.pid) == {"127.0.0.1"}
        assert "127.0.0.1" in listening(master.proc.pid)
        assert (tmp_path / "nats" / "nats.conf").read_text().count("max_payload") == 1
    finally:
        nats.stop()
        master.stop()
    for p in (nats.proc, master.proc):
        assert p.poll() is not None
        assert not Path(f"/proc/{p.pid}").exists()  # reaped, not a zombie


async def test_nats_credentials(tmp_path: Path) -> None:
    """A NATS server that wants a user and password: the settings' credentials get in, none do not."""
    from epd.core.runtime import connect
    from epd.ops.processes import find_binary, free_port, spawn, stop, wait_until

    port = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(f'listen: 127.0.0.1:{port}\nauthorization {{ user: "epd", password: "pw-for-tests" }}\n')
    proc = spawn([find_binary("nats-server"), "-c", str(conf)], tmp_path / "nats.log")
    try:
        wait_until(lambda: port_open("127.0.0.1", port), 20, "nats-server", proc)
        url = f"nats://127.0.0.1:{port}"
        nc = await connect(Settings(nats_url=url, nats_user="epd", nats_password="pw-for-tests"), "test")
        assert nc.is_connected
        await nc.close()
        with pytest.raises(nats.errors.Error):
            await nats.connect(url, max_reconnect_attempts=0, allow_reconnect=False, connect_timeout=2)
    finally:
        stop([proc])


def self_signed(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate for 127.0.0.1 signed by it: (ca, cert, key) PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "epd test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


async def test_nats_token_and_tls(tmp_path: Path) -> None:
    """TLS to NATS with the configured CA, and a token: both must be right to get in."""
    from epd.core.runtime import connect
    from epd.ops.processes import find_binary, free_port, spawn, stop, wait_until

    ca, cert, key = self_signed(tmp_path)
    port = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(
        f'listen: 127.0.0.1:{port}\nauthorization {{ token: "token-for-tests" }}\n'
        f'tls {{ cert_file: "{cert}", key_file: "{key}" }}\n'
    )
    proc = spawn([find_binary("nats-server"), "-c", str(conf)], tmp_path / "nats.log")
    try:
        wait_until(lambda: port_open("127.0.0.1", port), 20, "nats-server", proc)
        url = f"tls://127.0.0.1:{port}"
        good = Settings(nats_url=url, nats_token="token-for-tests", nats_tls_ca=str(ca))
        nc = await connect(good, "test")
        assert nc.is_connected
        await nc.close()
        for bad in (good.replace(nats_tls_ca=""), good.replace(nats_token="wrong")):  # unknown CA; wrong token
            with pytest.raises((nats.errors.Error, OSError)):
                await asyncio.wait_for(connect_once(bad), 10)
    finally:
        stop([proc])


async def connect_once(settings: Settings) -> None:
    from epd.core.runtime import nats_auth

    nc = await nats.connect(
        settings.nats_url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=3, **nats_auth(settings)
    )
    await nc.close()
