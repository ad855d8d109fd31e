"""Just enough of the protobuf wire format to read piece types from, and edit, a sentencepiece model.

The sentencepiece Python API neither tells a user-defined piece from a normal one nor lets an encode
call skip the dummy "▁" prefix, and the `protobuf` package is not a dependency; the few fields we
need are read and written here by hand (field numbers from sentencepiece_model.proto).
"""

from __future__ import annotations

from collections.abc import Iterator

_PIECES = 1  # ModelProto.pieces (repeated SentencePiece)
_NORMALIZER_SPEC = 3  # ModelProto.normalizer_spec
_PIECE_TYPE = 3  # SentencePiece.type
_ADD_DUMMY_PREFIX = 3  # NormalizerSpec.add_dummy_prefix
_NORMAL = 1  # SentencePiece.Type.NORMAL, the default when the field is absent

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes, int, int]]:
    """Yield `(field number, wire type, value, start, end)` for each field of one message."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _LEN:
            length, pos = _varint(buf, pos)
            value = buf[pos : pos + length]
            pos += length
        elif wire == _FIXED64:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == _FIXED32:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {start}")
        yield number, wire, value, start, pos


def piece_types(proto: bytes) -> list[int]:
    """The `SentencePiece.Type` of every piece, in id order."""
    types = []
    for number, wire, value, _, _ in _fields(proto):
        if number == _PIECES and wire == _LEN:
            kind = _NORMAL
            for n, w, v, _, _ in _fields(value):
                if n == _PIECE_TYPE and w == _VARINT:
                    kind = v
            types.append(kind)
    return types


def with_dummy_prefix(proto: bytes, enabled: bool) -> bytes:
    """The model proto with `normalizer_spec.add_dummy_prefix` set to `enabled`."""
    flag = _encode_varint(_ADD_DUMMY_PREFIX << 3 | _VARINT) + _encode_varint(int(enabled))
    out = bytearray()
    seen = False
    for number, wire, value, start, end in _fields(proto):
        if number != _NORMALIZER_SPEC or wire != _LEN:
            out += proto[start:end]
            continue
        seen = True
        spec = bytearray()
        for n, w, _, s, e in _fields(value):
            if not (n == _ADD_DUMMY_PREFIX and w == _VARINT):
                spec += value[s:e]
        spec += flag
        out += _encode_varint(_NORMALIZER_SPEC << 3 | _LEN) + _encode_varint(len(spec)) + spec
    if not seen:
        out += _encode_varint(_NORMALIZER_SPEC << 3 | _LEN) + _encode_varint(len(flag)) + flag
    return bytes(out)
