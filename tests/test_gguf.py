"""The fast GGUF header reader against the gguf package, and its errors."""

from __future__ import annotations

import pytest


def test_our_gguf_header_reader_agrees_with_gguf_s_reader(smollm2_gguf):
    """The fast header reader against the gguf package's GGUFReader: every key, value and tensor entry."""
    import gguf
    import numpy as np

    from meshllm.model.gguf_meta import read_header, tensor_array

    ref = gguf.GGUFReader(str(smollm2_gguf))
    ours = read_header(smollm2_gguf)
    assert set(ours.metadata) == set(ref.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        want = field.contents()
        assert ours.metadata[key] == (pytest.approx(want) if isinstance(want, float) else want), key
    assert set(ours.tensors) == {t.name for t in ref.tensors}
    with open(smollm2_gguf, "rb") as f:
        data = f.read()
    for t in ref.tensors[:12]:
        mine = ours.tensors[t.name]
        assert mine.dims == tuple(int(d) for d in t.shape) and mine.ggml_type == int(t.tensor_type)
        assert np.array_equal(tensor_array(data, mine), t.data), t.name


def test_a_truncated_gguf_is_named(smollm2_gguf, tmp_path):
    from meshllm.errors import ModelFileError
    from meshllm.model.gguf_meta import read_header

    bad = tmp_path / "cut.gguf"
    bad.write_bytes(smollm2_gguf.read_bytes()[:5000])
    with pytest.raises(ModelFileError, match="cut.gguf"):
        read_header(bad)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        read_header(junk)


def test_a_gguf_cut_inside_its_tensor_data_is_named(smollm2_gguf, tmp_path):
    from meshllm.errors import ModelFileError
    from meshllm.model.gguf_meta import read_header, tensor_array

    header = read_header(smollm2_gguf)
    cut = tmp_path / "short.gguf"
    cut.write_bytes(smollm2_gguf.read_bytes()[:header.data_offset + 1000])
    short = read_header(cut)  # the header is whole
    last = max(short.tensors.values(), key=lambda t: t.offset)
    with pytest.raises(ModelFileError, match="truncated"):
        tensor_array(cut.read_bytes(), last)
