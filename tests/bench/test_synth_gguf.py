"""bench/synth_gguf.py: a random-weight GGUF must have the real file's layout, or its speed means nothing."""

from __future__ import annotations

import gguf
import numpy as np
import pytest


@pytest.mark.model
def test_synthetic_copy_has_the_real_layout_and_tokenizer_but_other_weights(tiny_model_present, tmp_path,
                                                                            bench_script):
    synth = bench_script("synth_gguf")
    shape, out = tmp_path / "tiny.shape.json.gz", tmp_path / "synthetic.gguf"
    synth.describe(tiny_model_present, shape)
    synth.make(shape, out)

    real, fake = gguf.GGUFReader(tiny_model_present), gguf.GGUFReader(out)
    assert out.stat().st_size == tiny_model_present.stat().st_size
    def layout(reader):  # llama.cpp's quantizer may write tensors in another order
        return sorted((t.name, t.tensor_type, [int(n) for n in t.shape]) for t in reader.tensors)

    assert layout(fake) == layout(real)
    assert fake.fields["tokenizer.ggml.tokens"].contents() == real.fields["tokenizer.ggml.tokens"].contents()
    def embedding(reader):
        return next(t.data for t in reader.tensors if t.name == "token_embd.weight")

    assert not np.array_equal(embedding(fake), embedding(real))

    import llama_cpp

    model = llama_cpp.Llama(str(out), n_ctx=256, verbose=False)
    try:
        reference = llama_cpp.Llama(str(tiny_model_present), n_ctx=256, vocab_only=True, verbose=False)
        text = b"Refund invoice INV-2231, charged twice."
        assert model.tokenize(text) == reference.tokenize(text)
        assert model.create_completion("Hello", max_tokens=4, temperature=0)["usage"]["completion_tokens"] >= 1
    finally:
        model.close()
