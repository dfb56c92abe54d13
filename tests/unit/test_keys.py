import hashlib
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from common import keys


@pytest.fixture
def pair(tmp_path):
    priv, pub = tmp_path / "site.key", tmp_path / "site.pub"
    keys.generate_key_pair(priv, pub)
    return priv, pub


def test_private_key_file_is_owner_only_pkcs8(pair):
    priv, _ = pair
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert priv.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_public_key_file_is_one_openssh_line(pair):
    _, pub = pair
    text = pub.read_text()
    assert text.startswith("ecdsa-sha2-nistp256 AAAA")
    assert text.count("\n") == 1 and text.endswith("\n")


def test_loaded_halves_belong_together(pair):
    priv, pub = pair
    private_key, public_key = keys.load_private_key(priv), keys.load_public_key(pub)
    assert keys.openssh_bytes(private_key.public_key()) == keys.openssh_bytes(public_key)
    assert isinstance(public_key.curve, ec.SECP256R1)


@pytest.mark.parametrize("existing", ["private", "public"])
def test_refuses_to_overwrite_and_writes_nothing(tmp_path, existing):
    priv, pub = tmp_path / "a.key", tmp_path / "a.pub"
    target, other = (priv, pub) if existing == "private" else (pub, priv)
    target.write_text("keep me")
    with pytest.raises(FileExistsError, match=str(target)):
        keys.generate_key_pair(priv, pub)
    assert target.read_text() == "keep me"
    assert not other.exists()


def test_public_key_loads_from_pem_too(tmp_path, pair):
    _, pub = pair
    public_key = keys.load_public_key(pub)
    pem = tmp_path / "site.pem"
    pem.write_bytes(
        public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    assert keys.public_key_fingerprint(keys.load_public_key(pem)) == keys.public_key_fingerprint(
        public_key
    )


def test_load_errors_name_the_file(tmp_path):
    junk = tmp_path / "junk.key"
    junk.write_text("not a key\n")
    with pytest.raises(ValueError, match="junk.key"):
        keys.load_private_key(junk)
    with pytest.raises(ValueError, match="junk.key"):
        keys.load_public_key(junk)
    with pytest.raises(OSError, match="missing.key"):
        keys.load_private_key(tmp_path / "missing.key")


def test_wrong_key_types_are_refused(tmp_path):
    rsa_file = tmp_path / "rsa.key"
    rsa_file.write_bytes(
        rsa.generate_private_key(65537, 2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ValueError, match="rsa.key.*not a P-256"):
        keys.load_private_key(rsa_file)
    p384 = tmp_path / "p384.pub"
    p384.write_bytes(keys.openssh_bytes(ec.generate_private_key(ec.SECP384R1()).public_key()))
    with pytest.raises(ValueError, match="p384.pub.*not a P-256"):
        keys.load_public_key(p384)


def test_encrypted_private_key_is_refused(tmp_path):
    path = tmp_path / "locked.key"
    path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ValueError, match="locked.key is encrypted"):
        keys.load_private_key(path)


def test_fingerprint_is_sha256_of_the_openssh_line(pair):
    _, pub = pair
    public_key = keys.load_public_key(pub)
    expected = hashlib.sha256(pub.read_bytes().strip()).hexdigest()
    assert keys.public_key_fingerprint(public_key) == expected
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    assert keys.public_key_fingerprint(other) != expected


def test_sign_verify_round_trip_and_rejections():
    key = ec.generate_private_key(ec.SECP256R1())
    sig = keys.sign(key, b"hello")
    assert keys.verify(key.public_key(), b"hello", sig)
    assert not keys.verify(key.public_key(), b"hellO", sig)
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    assert not keys.verify(other, b"hello", sig)
    for junk in ("", "not base64!", "AAAA", None):
        assert not keys.verify(key.public_key(), b"hello", junk)


def test_update_signature_binds_run_round_and_digest():
    key = ec.generate_private_key(ec.SECP256R1())
    pub = key.public_key()
    sig = keys.sign_update(key, "run-7", 3, "ab" * 32)
    assert keys.verify_update(pub, "run-7", 3, "ab" * 32, sig)
    assert not keys.verify_update(pub, "run-7", 4, "ab" * 32, sig)
    assert not keys.verify_update(pub, "run-8", 3, "ab" * 32, sig)
    assert not keys.verify_update(pub, "run-7", 3, "cd" * 32, sig)
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    assert not keys.verify_update(other, "run-7", 3, "ab" * 32, sig)
    assert not keys.verify_update(pub, "run-7", True, "ab" * 32, sig)


def test_plain_signature_is_not_an_update_signature():
    key = ec.generate_private_key(ec.SECP256R1())
    undomained = b'{"digest":"d","round":1,"run_id":"r"}'
    assert not keys.verify_update(key.public_key(), "r", 1, "d", keys.sign(key, undomained))


@pytest.mark.parametrize("bad", [("", 1, "d"), ("r", -1, "d"), ("r", 1, ""), (7, 1, "d")])
def test_sign_update_rejects_bad_fields(bad):
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ValueError):
        keys.sign_update(key, *bad)
