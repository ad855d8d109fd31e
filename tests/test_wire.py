"""The wire core byte for byte, without sockets: framing, schema, tensor records, the HMAC handshake."""

from __future__ import annotations

import hashlib
import hmac
import random
import re

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshllm.errors import (
    AuthenticationError,
    HandshakeError,
    IntegrityError,
    LinkError,
    ProtocolError,
    RemoteError,
    VersionMismatchError,
)
from meshllm.wire.connection import Connection
from meshllm.wire.frames import (
    HEADER,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    FrameDecoder,
    check_tensor,
    decode_body,
    encode_frame,
    tensor_record,
)

SECRET = b"mesh secret"
NONCE_A, NONCE_B = b"A" * 32, b"B" * 32


def frame_of(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def hello(**fields) -> dict:
    """A well-formed hello from a peer 'beta' (fresh X25519 key), with `fields` replaced or added."""
    key = X25519PrivateKey.generate().public_key().public_bytes_raw()
    return {"t": "hello", "version": PROTOCOL_VERSION, "node": "beta", "nonce": NONCE_B, "key": key,
            "ciphers": ["chacha20-poly1305"], **fields}


def frames_in(data: bytes) -> list[dict]:
    """Decode a connection's output into its messages (for looking at what it sent)."""
    return FrameDecoder().feed(data)


def pair(secret_a: bytes = SECRET, secret_b: bytes = SECRET, **kw) -> tuple[Connection, Connection]:
    a = Connection(secret_a, "alpha", NONCE_A, initiator=True, info={"cores": 4}, **kw)
    b = Connection(secret_b, "beta", NONCE_B, initiator=False, info={"cores": 8})
    return a, b


def pump(a: Connection, b: Connection) -> tuple[list[dict], list[dict]]:
    """Move bytes both ways until both are quiet; return the app messages each received."""
    got: dict[int, list[dict]] = {id(a): [], id(b): []}
    moved = True
    while moved:
        moved = False
        for src, dst in ((a, b), (b, a)):
            data = src.data_to_send()
            if data:
                moved = True
                got[id(dst)].extend(dst.receive_data(data))
    return got[id(a)], got[id(b)]


def ready_pair() -> tuple[Connection, Connection]:
    a, b = pair()
    a.start()
    b.start()
    assert pump(a, b) == ([], [])
    assert a.state == b.state == "ready"
    return a, b


# -- framing -----------------------------------------------------------------------------------------------


def test_encode_frame_bytes_by_hand():
    # msgpack spec: fixmap of 2 = 0x82; fixstr of n = 0xa0|n; positive fixint 1 = 0x01
    body = b"\x82" + b"\xa1t" + b"\xa4ping" + b"\xa5nonce" + b"\x01"
    assert len(body) == 15
    assert encode_frame({"t": "ping", "nonce": 1}) == b"\x00\x00\x00\x0f" + body
    # bytes travel as bin 8 (0xc4, use_bin_type), never as str
    assert encode_frame({"t": "pong", "nonce": b"\x00\xff"}) == (
        b"\x00\x00\x00\x12" + b"\x82\xa1t\xa4pong\xa5nonce" + b"\xc4\x02\x00\xff"
    )


def test_decode_body_inverts_encode():
    msg = {"t": "part", "req": 1, "step": 2, "layer": 3, "phase": 0, "rank": 1,
           "x": tensor_record("float32", [1, 2], b"\x00" * 8)}
    assert decode_body(encode_frame(msg)[4:]) == msg


def test_outgoing_frame_over_limit_refused():
    with pytest.raises(ProtocolError, match=r"'pong' frame of \d+ bytes exceeds the 16-byte frame limit"):
        encode_frame({"t": "pong", "nonce": b"x" * 32}, max_frame=16)


STREAM = [
    {"t": "ping", "nonce": 1},
    {"t": "pong", "nonce": b"\x00\x01\x02"},
    {"t": "abort", "session": "s1", "req": 7, "reason": "cancelled"},
    {"t": "stats_reply", "session": "s1", "stats": {"rounds": 3, "p50": 0.25, "names": ["a", "b"]}},
]


def test_one_byte_at_a_time_equals_all_at_once():
    data = b"".join(encode_frame(m) for m in STREAM)
    whole = FrameDecoder().feed(data)
    dec = FrameDecoder()
    trickled = []
    for i in range(len(data)):
        trickled += dec.feed(data[i:i + 1])
    assert whole == trickled == STREAM
    assert dec.pending == 0


def test_several_frames_in_one_chunk():
    dec = FrameDecoder()
    assert dec.feed(b"".join(encode_frame(m) for m in STREAM)) == STREAM
    assert dec.pending == 0


def test_frame_split_across_chunks():
    data = encode_frame(STREAM[2])
    dec = FrameDecoder()
    assert dec.feed(data[:2]) == []  # inside the header
    assert dec.pending == 2
    assert dec.feed(data[2:9]) == []  # header done, body partial
    assert dec.pending == 9
    assert dec.feed(data[9:] + encode_frame(STREAM[0])[:5]) == [STREAM[2]]
    assert dec.pending == 5
    assert dec.feed(encode_frame(STREAM[0])[5:]) == [STREAM[0]]
    assert dec.pending == 0


def test_oversized_length_refused_before_the_body():
    dec = FrameDecoder(max_frame=100)
    with pytest.raises(ProtocolError, match="frame length 101 exceeds the 100-byte limit"):
        dec.feed(HEADER.pack(101))  # only the 4 header bytes: no need to wait for (or buffer) the body


def test_frame_of_exactly_max_size_accepted():
    body = msgpack.packb({"t": "pong", "nonce": b"x" * 10}, use_bin_type=True)
    assert FrameDecoder(max_frame=len(body)).feed(frame_of(body)) == [{"t": "pong", "nonce": b"x" * 10}]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"\xc1", "not valid msgpack"),  # 0xc1 is the one byte msgpack never uses
        (b"\x93\x01", "not valid msgpack"),  # array of 3 with one element
        (msgpack.packb({"t": "ping", "nonce": 1}) + b"\x01", "not valid msgpack"),  # trailing bytes
        (b"", "not valid msgpack"),
        (msgpack.packb({1: 2}), "not valid msgpack"),  # non-string map key
        (msgpack.packb([1, 2]), "msgpack list, expected a map"),
        (msgpack.packb("ping"), "msgpack str, expected a map"),
        (msgpack.packb({"nonce": 1}), r"^frame has no string 't' \(message type\) field$"),
        (msgpack.packb({"t": 5, "nonce": 1}), r"^frame has no string 't' \(message type\) field$"),
        (msgpack.packb({"t": "teleport"}), "unknown message type 'teleport'"),
        (msgpack.packb({"t": "ping"}), "'ping' message lacks field"),
        (msgpack.packb({"t": "part", "req": 1, "step": 1, "layer": 1, "rank": 0}), "lacks field.*phase, x"),
    ],
)
def test_bad_frames(body, problem):
    with pytest.raises(ProtocolError, match=problem):
        FrameDecoder().feed(frame_of(body))


def test_invalid_msgpack_is_named_by_msgpack_s_own_error():
    with pytest.raises(ProtocolError, match=f"^frame is not valid msgpack: {msgpack.ExtraData.__name__}: "):
        decode_body(msgpack.packb({"t": "ping", "nonce": 1}) + b"\x01")


def test_an_unknown_type_name_is_cut_to_40_characters_in_the_error():
    kind = "0123456789" * 10  # peer-chosen text: the error (and so the log line) stays short
    with pytest.raises(ProtocolError, match=re.escape(f"unknown message type {kind[:40]!r}") + "$"):
        decode_body(msgpack.packb({"t": kind}))


def test_a_frame_of_exactly_the_limit_is_sent():
    msg = {"t": "pong", "nonce": b"x" * 10}
    body = msgpack.packb(msg, use_bin_type=True)
    assert encode_frame(msg, max_frame=len(body)) == frame_of(body)
    with pytest.raises(ProtocolError, match="exceeds"):
        encode_frame(msg, max_frame=len(body) - 1)


def test_every_type_requires_its_fields():
    for kind, fields in MESSAGE_TYPES.items():
        full = {"t": kind, **{f: 0 for f in fields}}
        assert decode_body(msgpack.packb(full)) == full
        for f in fields:
            partial = {k: v for k, v in full.items() if k != f}
            with pytest.raises(ProtocolError, match=f"{kind!r} message lacks field"):
                decode_body(msgpack.packb(partial))


def test_pending_after_partial_frame():
    data = encode_frame({"t": "ping", "nonce": 1})
    dec = FrameDecoder()
    dec.feed(data[:-1])
    assert dec.pending == len(data) - 1


# -- tensor records ----------------------------------------------------------------------------------------


def test_tensor_record_round_trip():
    rec = tensor_record("float16", (2, 3), bytes(range(12)))
    assert rec == {"dtype": "float16", "shape": [2, 3], "data": bytes(range(12))}
    (msg,) = FrameDecoder().feed(encode_frame({"t": "sum", "req": 0, "step": 0, "layer": 0, "phase": 1, "x": rec}))
    assert check_tensor(msg["x"]) == ("float16", [2, 3], bytes(range(12)))
    assert check_tensor(tensor_record("float32", [0, 5], b"")) == ("float32", [0, 5], b"")
    assert check_tensor(tensor_record("int64", [], b"\x00" * 8)) == ("int64", [], b"\x00" * 8)  # a scalar


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        (tensor_record("float32", [2, 3], b"\x00" * 23), r"shape \[2, 3\] and dtype float32 needs 24 bytes, got 23"),
        (tensor_record("float32", [2, 3], b"\x00" * 25), "needs 24 bytes, got 25"),
        (tensor_record("bfloat16", [4], b"\x00" * 4), "needs 8 bytes, got 4"),
        (tensor_record("float64", [1], b"\x00" * 8), "unsupported dtype 'float64'"),
        ({"shape": [1], "data": b"\x00" * 4}, "unsupported dtype None"),
        (tensor_record("float32", [-1], b""), "malformed shape"),
        (tensor_record("float32", [2, -2], b""), "malformed shape"),
        (tensor_record("float32", [1.0], b"\x00" * 4), "malformed shape"),
        (tensor_record("float32", ["4"], b"\x00" * 16), "malformed shape"),
        ({"dtype": "float32", "shape": 4, "data": b"\x00" * 16}, "malformed shape"),
        ({"dtype": "float32", "shape": [1] * 9, "data": b"\x00" * 4}, "malformed shape"),
        ({"dtype": "float32", "shape": [1], "data": "abcd"}, "data is not bytes"),
        ([1, 2, 3], "is not a tensor record"),
    ],
)
def test_check_tensor_rejects(record, problem):
    with pytest.raises(ProtocolError, match=problem):
        check_tensor(record, "hidden state")


def test_check_tensor_accepts_up_to_8_dimensions():
    assert check_tensor(tensor_record("uint8", [1] * 8, b"\x07")) == ("uint8", [1] * 8, b"\x07")
    with pytest.raises(ProtocolError, match=r"^tensor has a malformed shape \[1, 1, 1, 1, 1, 1, 1, 1, 1\]$"):
        check_tensor(tensor_record("uint8", [1] * 9, b"\x07"))  # unnamed: "tensor"


def test_check_tensor_names_what():
    with pytest.raises(ProtocolError, match="^partial of rank 2 has unsupported dtype"):
        check_tensor({"dtype": "complex64", "shape": [1], "data": b""}, "partial of rank 2")


@pytest.mark.parametrize("dtype", [["float32"], {"a": 1}])
def test_check_tensor_unhashable_dtype_is_a_protocol_error(dtype):
    (msg,) = FrameDecoder().feed(encode_frame({"t": "ping", "nonce": {"dtype": dtype, "shape": [1],
                                                                     "data": b"\x00" * 4}}))
    with pytest.raises(ProtocolError, match="unsupported dtype"):
        check_tensor(msg["nonce"])


# -- handshake ---------------------------------------------------------------------------------------------


def test_handshake_reaches_ready_and_learns_peers():
    a, b = pair()
    assert a.state == b.state == "new"
    a.start()
    b.start()
    assert a.state == b.state == "hello_sent"
    pump(a, b)
    assert a.state == b.state == "ready"
    assert (a.peer_id, b.peer_id) == ("beta", "alpha")
    assert a.peer_info == {"cores": 8} and b.peer_info == {"cores": 4}
    a.receive_eof()  # a clean close after the handshake is not an error
    b.receive_eof()


def test_handshake_messages_on_the_wire():
    """The hello, the key agreement, the proofs and the first sealed frame, recomputed here from the documented
    formula with the primitives themselves (this test plays the initiator by hand)."""
    b = Connection(SECRET, "beta", NONCE_B, initiator=False, info={"cores": 8})
    b.start()
    ours = X25519PrivateKey.generate()
    pub = ours.public_key().public_bytes_raw()
    offer = ["aes256-gcm", "chacha20-poly1305"]
    assert b.receive_data(encode_frame({"t": "hello", "version": PROTOCOL_VERSION, "node": "alpha",
                                        "nonce": NONCE_A, "key": pub, "ciphers": offer, "info": {}})) == []
    hello_b, auth_b = frames_in(b.data_to_send())
    assert {k: v for k, v in hello_b.items() if k != "key"} == {
        "t": "hello", "version": PROTOCOL_VERSION, "node": "beta", "nonce": NONCE_B, "ciphers": b.ciphers,
        "info": {"cores": 8}}
    shared = ours.exchange(X25519PublicKey.from_public_bytes(hello_b["key"]))
    mesh_key = hashlib.scrypt(SECRET, salt=b"meshllm mesh key v1", n=2**15, r=8, p=1, maxmem=2**26, dklen=32)
    fields = [NONCE_A, NONCE_B, b"alpha", b"beta", pub, hello_b["key"], ",".join(offer).encode(),
              ",".join(hello_b["ciphers"]).encode()]
    context = b"".join(len(f).to_bytes(4, "big") + f for f in fields)
    okm = HKDF(algorithm=SHA256(), length=96, salt=mesh_key, info=b"meshllm link keys v1" + context).derive(shared)
    assert auth_b == {"t": "auth", "mac": hmac.new(okm[:32], b"responder", hashlib.sha256).digest()}
    assert b.state == "auth_sent"
    b.receive_data(encode_frame({"t": "auth", "mac": hmac.new(okm[:32], b"initiator", hashlib.sha256).digest()}))
    assert b.state == "ready"
    assert b.cipher == ("aes256-gcm" if "aes256-gcm" in b.ciphers else "chacha20-poly1305")
    aead = AESGCM if b.cipher == "aes256-gcm" else ChaCha20Poly1305
    b.send({"t": "ping", "nonce": 7})
    b.send({"t": "ping", "nonce": 8})
    data = b.data_to_send()
    first = 4 + HEADER.unpack_from(data)[0]
    for n, (header, sealed) in enumerate(((data[:4], data[4:first]), (data[first:first + 4], data[first + 4:]))):
        # responder -> initiator key, nonce = the frame's number, the length header authenticated
        plain = aead(okm[64:]).decrypt(n.to_bytes(12, "little"), sealed, header)
        assert msgpack.unpackb(plain) == {"t": "ping", "nonce": 7 + n}
    # and what we seal with the initiator -> responder key, it opens
    body = msgpack.packb({"t": "pong", "nonce": 7})
    header = HEADER.pack(len(body) + 16)
    assert b.receive_data(header + aead(okm[32:64]).encrypt(bytes(12), body, header)) == [{"t": "pong", "nonce": 7}]


def test_app_messages_pass_both_ways():
    a, b = ready_pair()
    a.send({"t": "ping", "nonce": 1})
    a.send({"t": "step", "session": "s", "req": 0, "step": 0, "start": 0,
            "x": tensor_record("float32", [1], b"\x00\x00\x80\x3f")})
    b.send({"t": "pong", "nonce": 1})
    to_a, to_b = pump(a, b)
    assert to_b == [{"t": "ping", "nonce": 1},
                    {"t": "step", "session": "s", "req": 0, "step": 0, "start": 0,
                     "x": {"dtype": "float32", "shape": [1], "data": b"\x00\x00\x80\x3f"}}]
    assert to_a == [{"t": "pong", "nonce": 1}]
    assert a.bytes_out == b.bytes_in and b.bytes_out == a.bytes_in


def test_app_message_right_behind_the_auth_is_delivered():
    a, b = pair()
    a.start()
    b.start()
    b.receive_data(a.data_to_send())
    a.receive_data(b.data_to_send())
    assert a.state == "ready" and b.state == "auth_sent"
    a.send({"t": "ping", "nonce": 9})  # same chunk as a's auth
    assert b.receive_data(a.data_to_send()) == [{"t": "ping", "nonce": 9}]
    assert b.state == "ready"


def test_wrong_secret_refused_on_both_sides():
    a, b = pair(secret_a=b"one secret", secret_b=b"another secret")
    a.start()
    b.start()
    a_hello = a.data_to_send()
    b.receive_data(a_hello)
    with pytest.raises(AuthenticationError) as ea:
        a.receive_data(b.data_to_send())
    a_out = a.data_to_send()
    with pytest.raises(AuthenticationError) as eb:
        b.receive_data(a_out)
    for e in (ea, eb):
        assert "different mesh secret" in str(e.value)
        assert "use the same --secret" in str(e.value)
    assert "'beta'" in str(ea.value) and "'alpha'" in str(eb.value)
    assert a.state == b.state == "closed"

    # what a sent after its auth: the refusal, with the reason and the fix
    error = frames_in(a_out)[-1]
    assert error["t"] == "error" and error["code"] == "auth"
    assert "the mesh secrets differ" in error["reason"] and "--secret" in error["reason"]
    # a peer that gets only the error frame (it has not checked a's proof) raises the same error class
    b2 = Connection(b"another secret", "beta", NONCE_B, initiator=False)
    b2.start()
    b2.receive_data(a_hello)
    with pytest.raises(AuthenticationError, match="refused by the peer: authentication failed: the mesh secrets "
                                                  "differ; use the same --secret"):
        b2.receive_data(encode_frame(error))
    assert b2.state == "closed"


def test_version_mismatch_refused_on_both_sides():
    a, b = pair(version=PROTOCOL_VERSION + 1)
    a.start()
    b.start()
    with pytest.raises(VersionMismatchError) as eb:
        b.receive_data(a.data_to_send())
    b_out = b.data_to_send()
    with pytest.raises(VersionMismatchError) as ea:
        a.receive_data(b_out)
    assert f"this device speaks version {PROTOCOL_VERSION}, the peer version {PROTOCOL_VERSION + 1}" in str(eb.value)
    assert f"this device speaks version {PROTOCOL_VERSION + 1}, the peer version {PROTOCOL_VERSION}" in str(ea.value)
    assert "same meshllm release" in str(ea.value)
    assert a.state == b.state == "closed"

    hello, error = frames_in(b_out)
    assert hello["version"] == PROTOCOL_VERSION
    assert error["code"] == "version" and \
        f"version {PROTOCOL_VERSION}, the peer version {PROTOCOL_VERSION + 1}" in error["reason"]
    a2 = Connection(SECRET, "alpha", NONCE_A, initiator=True, version=PROTOCOL_VERSION + 1)
    a2.start()
    with pytest.raises(VersionMismatchError, match="refused by the peer: protocol version mismatch"):
        a2.receive_data(encode_frame(error))


def test_app_message_before_handshake_refused():
    a, b = pair()
    with pytest.raises(HandshakeError, match="cannot send 'ping' before the handshake completes"):
        a.send({"t": "ping", "nonce": 1})
    a.start()
    b.start()
    b.receive_data(a.data_to_send())
    with pytest.raises(HandshakeError, match="before the handshake completes"):
        b.send({"t": "ping", "nonce": 1})  # auth_sent is not ready
    assert frames_in(b.data_to_send())[-1]["t"] == "auth"


def test_peer_app_message_during_handshake_refused():
    a, _ = pair()
    a.start()
    a.data_to_send()
    with pytest.raises(ProtocolError, match="peer sent 'ping' during the handshake"):
        a.receive_data(encode_frame({"t": "ping", "nonce": 1}))
    assert frames_in(a.data_to_send()) == [{"t": "error", "code": "protocol",
                                            "reason": "unexpected 'ping' during the handshake"}]
    assert a.state == "closed"


@pytest.mark.parametrize("kind", ["hello", "auth"])
def test_handshake_message_after_ready_refused(kind):
    a, b = ready_pair()
    extra = hello() if kind == "hello" else {"t": "auth", "mac": b"\x00" * 32}
    with pytest.raises(ProtocolError, match=f"sent {kind!r} after the handshake"):
        a.receive_data(b.encode(extra))  # sealed by the peer, as every frame after the handshake
    assert a.state == "closed"
    with pytest.raises(RemoteError, match=f"closed the link: unexpected {kind!r} after the handshake$"):
        b.receive_data(a.data_to_send())


def test_second_hello_refused():
    a, _ = pair()
    a.start()
    again = encode_frame(hello())
    a.receive_data(again)
    with pytest.raises(ProtocolError, match="'hello' during the handshake"):
        a.receive_data(again)


@pytest.mark.parametrize("bad", [{"node": 5}, {"node": ""}, {"node": "n" * 257}, {"nonce": b"short"},
                                 {"nonce": "A" * 32}, {"nonce": b"n" * 65}, {"key": b"k" * 31}, {"key": "k" * 32},
                                 {"key": None}, {"key": bytes(32)}, {"ciphers": "aes256-gcm"}, {"ciphers": [1]},
                                 {"ciphers": ["x"] * 9}])
def test_malformed_hello_refused(bad):
    a, _ = pair()
    a.start()
    with pytest.raises(ProtocolError, match="malformed hello"):
        a.receive_data(encode_frame(hello(**bad)))


def test_replayed_auth_from_another_session_refused():
    a, b = pair()
    a.start()
    b.start()
    hello = a.data_to_send()
    b.receive_data(hello)
    a.receive_data(b.data_to_send())
    auth = a.data_to_send()  # a's proof for this session's nonces
    assert [m["t"] for m in frames_in(hello + auth)] == ["hello", "auth"]
    assert b.receive_data(auth) == []
    assert b.state == "ready"
    recorded = hello + auth

    # a new session: b has a fresh nonce, so the recorded proof no longer fits
    b2 = Connection(SECRET, "beta", b"C" * 32, initiator=False)
    b2.start()
    with pytest.raises(AuthenticationError):
        b2.receive_data(recorded)
    assert b2.state == "closed"


@pytest.mark.parametrize("initiator", [True, False])
def test_reflected_hello_and_auth_do_not_authenticate(initiator):
    c = Connection(SECRET, "alpha", NONCE_A, initiator=initiator)
    c.start()
    with pytest.raises(AuthenticationError, match="own node id"):
        c.receive_data(c.data_to_send())  # its own hello, echoed: a peer with our own id is refused at once
    assert c.state == "closed"


def _reflect_across_sessions(victim_id: str, id1: str, nonce1_of, id2: str, nonce2_of) -> Connection:
    """An attacker without the secret opens one link to the victim (victim responds) and gets the victim to dial it
    (victim initiates); it picks its hellos so that the victim's initiator proof on link 2 is the proof link 1
    expects. Returns link 1's victim side after feeding it that proof."""
    listening = Connection(SECRET, victim_id, b"\x01" * 32, initiator=False)
    dialing = Connection(SECRET, victim_id, b"\x02" * 32, initiator=True)
    listening.start()
    dialing.start()
    n_listen = frames_in(listening.data_to_send())[0]["nonce"]
    n_dial = frames_in(dialing.data_to_send())[0]["nonce"]
    try:
        listening.receive_data(encode_frame({"t": "hello", "version": PROTOCOL_VERSION, "node": id1, "nonce": nonce1_of(n_dial)}))
        listening.data_to_send()
        dialing.receive_data(encode_frame({"t": "hello", "version": PROTOCOL_VERSION, "node": id2, "nonce": nonce2_of(n_listen)}))
        (proof,) = frames_in(dialing.data_to_send())
        listening.receive_data(encode_frame(proof))
    except LinkError:
        pass
    return listening


def test_cross_session_relay_without_tricks_refused():
    """Control for the two tests below: an honest-looking attacker id gets nothing from relaying proofs."""
    link = _reflect_across_sessions("victim", "mallory", lambda n_dial: n_dial, "mallory", lambda n_listen: n_listen)
    assert link.state == "closed"


def test_cross_session_reflection_with_own_node_id_refused():
    link = _reflect_across_sessions("victim", "victim", lambda n_dial: n_dial, "victim", lambda n_listen: n_listen)
    assert link.state != "ready"


def test_cross_session_reflection_with_ambiguous_fields_refused():
    link = _reflect_across_sessions("victim", "x|victim|y", lambda n_dial: n_dial,
                                    "y|victim", lambda n_listen: n_listen + b"|x")
    assert link.state != "ready"


def test_data_after_close_is_ignored():
    a, b = ready_pair()
    a.close_with_error("shutdown", "bye")
    assert a.state == "closed"
    with pytest.raises(RemoteError, match="^peer alpha closed the link: bye$"):
        b.receive_data(a.data_to_send())
    before = a.bytes_in
    assert a.receive_data(encode_frame({"t": "ping", "nonce": 1})) == []
    assert a.receive_data(b"\xff\xff\xff\xff garbage") == []
    assert a.bytes_in == before
    a.close_with_error("again", "ignored")  # one error frame only
    assert a.data_to_send() == b""


def test_data_after_a_failure_is_ignored():
    a, b = pair(secret_b=b"other")
    a.start()
    b.start()
    b.receive_data(a.data_to_send())
    with pytest.raises(AuthenticationError):
        a.receive_data(b.data_to_send())
    assert a.receive_data(encode_frame({"t": "ping", "nonce": 1})) == []


def test_peer_error_after_ready_is_a_remote_error():
    a, b = ready_pair()
    b.close_with_error("abort", "the originator cancelled")
    with pytest.raises(RemoteError, match="peer beta closed the link: the originator cancelled"):
        a.receive_data(b.data_to_send())
    assert a.state == "closed"


def test_bad_frame_closes_with_a_protocol_error_frame():
    a, b = ready_pair()
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        a.receive_data(b.frame(b"\xc1"))  # sealed, so it opens: then it is not msgpack
    with pytest.raises(RemoteError, match="not valid msgpack"):
        b.receive_data(a.data_to_send())


def test_eof_inside_a_frame_is_truncation():
    a, b = ready_pair()
    b.send({"t": "ping", "nonce": 1})
    data = b.data_to_send()
    assert a.receive_data(data[:-3]) == []
    with pytest.raises(ProtocolError, match=r"closed inside a frame \(\d+ bytes of a truncated frame\)"):
        a.receive_eof()


def test_eof_during_handshake():
    a, b = pair()
    a.start()
    with pytest.raises(HandshakeError, match="^peer closed the connection during the handshake$"):
        a.receive_eof()
    b.start()
    b.receive_data(a.data_to_send())
    with pytest.raises(HandshakeError, match="during the handshake"):
        b.receive_eof()  # auth_sent, not yet ready


def test_short_nonce_refused():
    with pytest.raises(ValueError, match="^nonce must be at least 16 random bytes$"):
        Connection(SECRET, "alpha", b"x" * 15, initiator=True)
    Connection(SECRET, "alpha", b"x" * 16, initiator=True)  # 16 is enough


def test_a_peer_is_unknown_until_its_hello():
    a, b = pair()
    assert (a.peer_id, a.peer_info) == (None, {})
    a.start()
    b.start()
    b.receive_data(a.data_to_send())
    assert (b.peer_id, b.peer_info) == ("alpha", {"cores": 4})


@pytest.mark.parametrize("info", [[1, 2], "cores", None])
def test_a_hello_whose_info_is_not_a_map_gives_empty_peer_info(info):
    a, _ = pair()
    a.start()
    msg = hello(info=info)
    a.receive_data(encode_frame(msg if info is not None else {k: v for k, v in msg.items() if k != "info"}))
    assert a.state == "auth_sent" and a.peer_info == {}


def test_a_16_byte_peer_nonce_is_enough():
    a, _ = pair()
    a.start()
    a.receive_data(encode_frame(hello(nonce=b"n" * 16)))
    assert a.state == "auth_sent"


def test_byte_counters_count_exactly_what_moved():
    a, b = pair()
    a.start()
    out = a.data_to_send()
    assert a.bytes_out == len(out) and b.bytes_in == 0
    b.receive_data(out)
    assert b.bytes_in == len(out)


def test_an_app_message_over_the_link_frame_limit_is_not_sent():
    a = Connection(SECRET, "alpha", NONCE_A, initiator=True, max_frame=300)
    b = Connection(SECRET, "beta", NONCE_B, initiator=False)
    a.start()
    b.start()
    pump(a, b)
    assert a.state == "ready"
    with pytest.raises(ProtocolError, match="'pong' frame of .* exceeds the 300-byte frame limit"):
        a.send({"t": "pong", "nonce": b"x" * 300})  # the peer would refuse it


def test_a_refused_hello_tells_the_peer_why():
    """The error frame a refused hello sends: its code selects the peer's exception, its reason is shown."""
    a, _ = pair()
    a.start()
    a.data_to_send()
    with pytest.raises(ProtocolError, match="^peer sent a malformed hello$"):
        a.receive_data(encode_frame(hello(node=5)))
    assert frames_in(a.data_to_send()) == [{"t": "error", "code": "protocol", "reason": "malformed hello"}]
    c = Connection(SECRET, "alpha", NONCE_A, initiator=False)
    c.start()
    c.data_to_send()
    with pytest.raises(AuthenticationError):
        c.receive_data(encode_frame(hello(node="alpha")))
    assert frames_in(c.data_to_send()) == [{"t": "error", "code": "auth",
                                            "reason": "peer claims this device's own node id"}]


def test_a_refusal_with_another_code_is_a_handshake_error_with_its_reason():
    a, _ = pair()
    a.start()
    with pytest.raises(HandshakeError, match="^refused by the peer: busy$") as e:
        a.receive_data(encode_frame({"t": "error", "code": "overloaded", "reason": "busy"}))
    assert type(e.value) is HandshakeError
    assert a.state == "closed"


def test_eof_on_a_link_already_closed_is_not_an_error():
    a, b = ready_pair()
    b.send({"t": "ping", "nonce": 1})
    a.receive_data(b.data_to_send()[:-1])  # a partial frame is pending ...
    a.close_with_error("shutdown", "bye")  # ... when this side gives up on the link
    a.receive_eof()


# -- property: random splits of a random stream --------------------------------------------------------------

_leaves = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
           | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=64))
_values = st.recursive(_leaves, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)


@st.composite
def _messages(draw):
    kind = draw(st.sampled_from(sorted(MESSAGE_TYPES)))
    msg = {"t": kind, **{f: draw(_values) for f in MESSAGE_TYPES[kind]}}
    if draw(st.booleans()):
        msg["x"] = tensor_record("float32", [2], draw(st.binary(min_size=8, max_size=8)))
    return msg


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_messages(), min_size=1, max_size=8), st.randoms(use_true_random=False))
def test_random_splits_decode_to_the_same_messages(messages, rnd):
    data = b"".join(encode_frame(m) for m in messages)
    cuts = sorted(rnd.sample(range(len(data) + 1), min(len(data) + 1, rnd.randint(0, 12))))
    dec = FrameDecoder()
    out = []
    for lo, hi in zip([0, *cuts], [*cuts, len(data)]):
        out += dec.feed(data[lo:hi])
    assert out == messages
    assert dec.pending == 0


def test_random_splits_through_a_connection():
    """The same over a handshaken link: app messages survive any chunking, seeded."""
    rnd = random.Random(1234)
    for _ in range(20):
        a, b = ready_pair()
        sent = [{"t": "pong", "nonce": rnd.randbytes(rnd.randint(0, 300))} for _ in range(rnd.randint(1, 10))]
        for m in sent:
            a.send(m)
        data = a.data_to_send()
        got, i = [], 0
        while i < len(data):
            j = i + rnd.randint(1, 64)
            got += b.receive_data(data[i:j])
            i = j
        assert got == sent


def test_frames_are_small_until_the_peer_has_proved_the_secret():
    """A stranger cannot make a device buffer a large frame: before the handshake the limit is 64 KiB."""
    c = Connection(SECRET, "alpha", NONCE_A, initiator=False, max_frame=2**20)
    c.start()
    with pytest.raises(ProtocolError, match="exceeds the 65536-byte limit"):
        c.receive_data(HEADER.pack(100_000))
    a, b = ready_pair()
    big = {"t": "ping", "nonce": b"x" * 200_000}
    assert b.receive_data(a.encode(big)) == [big]  # after it, the full frame limit applies


# -- sealed frames --------------------------------------------------------------------------------------------


def _three_pings() -> tuple[Connection, Connection, list[bytes], list[dict]]:
    a, b = ready_pair()
    sent = [{"t": "ping", "nonce": i} for i in range(3)]
    frames = [a.encode(m) for m in sent]
    return a, b, frames, sent


def test_the_payload_is_not_on_the_wire():
    a, b = ready_pair()
    secret_payload = b"My bank PIN is 4921" * 4
    a.send({"t": "pong", "nonce": secret_payload})
    data = a.data_to_send()
    assert secret_payload[:19] not in data and b"pong" not in data
    assert b.receive_data(data) == [{"t": "pong", "nonce": secret_payload}]


def test_a_replayed_frame_fails_to_open():
    _, b, frames, sent = _three_pings()
    assert b.receive_data(frames[0]) == [sent[0]]
    with pytest.raises(IntegrityError, match="frame 1 failed its integrity check: altered, replayed, reordered"):
        b.receive_data(frames[0])
    assert b.state == "closed"
    assert b.receive_data(frames[1]) == []  # nothing more is read from a link that failed


def test_reordered_or_dropped_frames_fail_to_open():
    _, b, frames, _ = _three_pings()
    with pytest.raises(IntegrityError, match="frame 0 failed"):
        b.receive_data(frames[1])  # frame 0 dropped (or 1 overtook it)
    _, b, frames, sent = _three_pings()
    assert b.receive_data(frames[0]) == [sent[0]]
    with pytest.raises(IntegrityError):
        b.receive_data(frames[2])


def test_a_frame_from_another_link_fails_to_open():
    """Each link has its own keys: a frame recorded on one link is garbage on another between the same devices."""
    _, _, frames, _ = _three_pings()
    _, b2 = ready_pair()
    with pytest.raises(IntegrityError):
        b2.receive_data(frames[0])


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_flipped_byte_never_changes_a_message(data):
    """Flip any bit of any byte of a sealed stream: what comes out is a prefix of what went in, then an error (or a
    wait for bytes that never come, when the flip lengthened a header: the link's silence timeout ends that)."""
    a, b, frames, sent = _three_pings()
    stream = bytearray(b"".join(frames))
    i = data.draw(st.integers(0, len(stream) - 1), label="byte")
    stream[i] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    got: list[dict] = []
    try:
        got = b.receive_data(bytes(stream))
        failed = False
    except (IntegrityError, ProtocolError):
        failed = True
    assert got == sent[:len(got)] and len(got) < len(sent)
    assert failed or b._decoder.pending > 0


def test_the_cipher_is_aes_gcm_only_when_both_sides_offer_it():
    from meshllm.wire.keys import choose_cipher

    assert choose_cipher(["aes256-gcm", "chacha20-poly1305"], ["aes256-gcm", "chacha20-poly1305"]) == "aes256-gcm"
    assert choose_cipher(["aes256-gcm", "chacha20-poly1305"], ["chacha20-poly1305"]) == "chacha20-poly1305"
    assert choose_cipher(["chacha20-poly1305"], ["aes256-gcm", "chacha20-poly1305"]) == "chacha20-poly1305"
    assert choose_cipher(["aes256-gcm"], ["chacha20-poly1305"]) is None
    assert choose_cipher(["rot13"], ["rot13"]) is None  # only ciphers we know


def test_a_link_between_an_aes_device_and_one_without_runs_chacha():
    a, b = pair()
    b.ciphers = ["chacha20-poly1305"]  # a board without AES instructions
    a.start()
    b.start()
    pump(a, b)
    assert a.cipher == b.cipher == "chacha20-poly1305"
    a.send({"t": "ping", "nonce": 1})
    assert b.receive_data(a.data_to_send()) == [{"t": "ping", "nonce": 1}]


def test_no_cipher_in_common_is_refused_with_both_lists():
    a, _ = pair()
    a.start()
    with pytest.raises(VersionMismatchError, match="no cipher in common: this device offers .*, the peer rot13"):
        a.receive_data(encode_frame(hello(ciphers=["rot13"])))


def test_a_relay_that_swaps_the_keys_cannot_complete_the_handshake():
    """A relay in the middle that replaces each hello's X25519 key with its own (to read the link) must forge the
    proofs, which need the mesh key: both sides refuse."""
    a, b = pair()
    a.start()
    b.start()
    relay = X25519PrivateKey.generate().public_key().public_bytes_raw()

    def swap(data: bytes) -> bytes:
        return b"".join(encode_frame({**m, "key": relay} if m["t"] == "hello" else m) for m in frames_in(data))

    b.receive_data(swap(a.data_to_send()))
    with pytest.raises(AuthenticationError):
        a.receive_data(swap(b.data_to_send()))


# -- unpack limits ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bomb, why", [
    (msgpack.packb({"t": "ping", "nonce": [[]] * 10_000}), "more than 4096 arrays and maps"),
    (msgpack.packb({"t": "ping", "nonce": [{}] * 10_000}), "more than 4096 arrays and maps"),
    (msgpack.packb({"t": "ping", "nonce": [0] * 70_000}), "exceeds an unpack limit: .*max_array_len"),  # one array over the item cap
    (msgpack.packb({"t": "ping", "nonce": [[0] * 60_000, [0] * 60_000]}), "more than 65536 array items"),
    (msgpack.packb({"t": "ping", "nonce": {str(i): 0 for i in range(70_000)}}), "exceeds an unpack limit: .*max_map_len"),
    (b"\x82\xa1t\xa4ping\xa5nonce" + b"\x91" * 100_000 + b"\xc0", "more than 4096 arrays|not valid msgpack"),
    (msgpack.packb({"t": "ping", "nonce": "x" * (2**20 + 1)}), "exceeds an unpack limit: .*max_str_len"),  # one string over 1 MiB
])
def test_a_frame_cannot_unpack_into_much_more_than_its_size(bomb, why):
    with pytest.raises(ProtocolError, match=why):
        decode_body(bomb)


def test_what_our_messages_carry_is_within_the_unpack_limits():
    blocks = [[i, "attn"] for i in range(2000)]  # a shard's block list of a 1000-layer model
    msg = {"t": "need", "session": "s", "blocks": blocks}
    assert decode_body(msgpack.packb(msg)) == msg
    big = {"t": "slice", "session": "s", "block": 1, "offset": 0, "data": b"\x01" * (8 << 20)}
    assert decode_body(msgpack.packb(big)) == big


@settings(max_examples=200, deadline=None)
@given(_values)
def test_every_value_decodes_to_what_was_packed(value):
    msg = {"t": "ping", "nonce": value}
    assert decode_body(msgpack.packb(msg, use_bin_type=True)) == msg


# -- the secret ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("secret, why", [("sunshine", "short (8 characters"),
                                         ("ab" * 12, "little variety"), ("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "variety")])
def test_a_weak_secret_is_named(secret, why):
    from meshllm.wire.keys import secret_weakness

    assert why in secret_weakness(secret)


def test_a_made_secret_is_strong():
    from meshllm.runtime.device import new_secret
    from meshllm.wire.keys import secret_weakness

    for _ in range(20):
        assert secret_weakness(new_secret()) is None
