"""The TXT record and the mesh id, pure: the mesh id against an independent PBKDF2, the record's limits."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from meshllm.discovery.records import MAX_VALUE, PeerRecord, RecordError, decode, mesh_id
from meshllm.wire.frames import PROTOCOL_VERSION

MESH = "0123456789abcdef"
PROPS = {b"id": b"dev-a", b"v": str(PROTOCOL_VERSION).encode(), b"mesh": MESH.encode(), b"score": b"12.500",
         b"cores": b"4", b"mem": b"8589934592", b"disk": b"107374182400"}


def _decode(**changes) -> PeerRecord:
    """PROPS with some values replaced, decoded at a valid address and port."""
    props = {**PROPS, **{k.encode(): v for k, v in changes.items()}}
    return decode(props, ("192.0.2.7",), 7340)


def test_the_mesh_id_is_an_hmac_under_the_scrypt_stretched_key():
    # the spec: scrypt (RFC 7914; N=2^15, r=8, p=1, salt "meshllm mesh key v1", 32 bytes) of the secret, then
    # HMAC-SHA256 of "meshllm mesh id v2" under it; 8 bytes as 16 lowercase hex digits
    for secret in (b"secret-one", b"secret-two", b"", "caf\u00e9 \U0001f511".encode(), bytes(range(256))):
        key = hashlib.scrypt(secret, salt=b"meshllm mesh key v1", n=2**15, r=8, p=1, maxmem=2**26, dklen=32)
        expected = hmac.new(key, b"meshllm mesh id v2", hashlib.sha256).digest()[:8].hex()
        assert mesh_id(secret) == expected


def test_a_record_decodes_from_str_keys_and_values_as_from_bytes():
    as_str = {k.decode(): v.decode() for k, v in PROPS.items()}
    assert decode(as_str, ("192.0.2.7",), 7340) == _decode()


def test_a_record_lists_its_fields_and_its_address():
    r = _decode(budget=b"1024")
    assert r.to_dict() == {"node_id": "dev-a", "version": PROTOCOL_VERSION, "mesh": MESH, "score": 12.5, "cores": 4,
                           "memory_bytes": 8 << 30, "disk_bytes": 100 << 30, "budget_bytes": 1024,
                           "addresses": ["192.0.2.7"], "port": 7340, "address": "192.0.2.7:7340"}


@pytest.mark.parametrize("as_bytes", [True, False])
def test_a_value_may_be_64_bytes_long_but_not_65(as_bytes):
    def value(n: int):
        text = "d" * n
        return text.encode() if as_bytes else text

    assert _decode(id=value(MAX_VALUE)).node_id == "d" * MAX_VALUE
    with pytest.raises(RecordError, match="'id' is"):
        _decode(id=value(MAX_VALUE + 1))


@pytest.mark.parametrize("value", [b"", "", 5, [b"dev"]])
def test_an_empty_or_odd_value_is_rejected(value):
    with pytest.raises(RecordError, match="^'id' is empty or too long$"):
        _decode(id=value)


@pytest.mark.parametrize("mesh", [b"0123456789abcdeg", b"0123456789ABCDEF", b"XXXXXXXXXXXXXXXX", b"0123456789abcde",
                                  b"0123456789abcdef0"])
def test_a_mesh_id_must_be_16_lowercase_hex_digits(mesh):
    with pytest.raises(RecordError, match="^'mesh' is not 16 hex digits"):
        _decode(mesh=mesh)


@pytest.mark.parametrize("score, why", [(b"0", "^'score' must be a positive number"),
                                        (b"fast", "^'score' is not a number$")])
def test_a_score_must_be_a_positive_number(score, why):
    with pytest.raises(RecordError, match=why):
        _decode(score=score)


def test_ports_1_to_65535_are_accepted():
    for port in (1, 65535):
        assert decode(PROPS, ("192.0.2.7",), port).address == f"192.0.2.7:{port}"
    for port in (0, 65536):
        with pytest.raises(RecordError, match=f"^port {port} is out of range$"):
            decode(PROPS, ("192.0.2.7",), port)
    with pytest.raises(RecordError, match="^port 0 is out of range$"):
        decode(PROPS)  # a record seen without its service's port cannot be used
