"""Latent codecs: pixel identity and tiny random diffusers autoencoders saved to disk and loaded by path."""
import pytest
import torch

from tim_ray.models.codecs import CodecError, PixelCodec, load_codec


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny_kl(path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                  latent_channels=4, norm_num_groups=8, sample_size=32).save_pretrained(path)
    return path


def tiny_dc(path):
    from diffusers import AutoencoderDC

    torch.manual_seed(0)
    AutoencoderDC(in_channels=3, latent_channels=8, attention_head_dim=8,
                  encoder_block_types=("ResBlock", "EfficientViTBlock"),
                  decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(16, 32),
                  decoder_block_out_channels=(16, 32), encoder_layers_per_block=(1, 1),
                  decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), (5,)),
                  decoder_qkv_multiscales=((), (5,)), scaling_factor=0.41407).save_pretrained(path)
    return path


def images(batch=2, height=32, width=48):
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_pixel_is_the_identity_with_any_channel_count():
    codec = load_codec("pixel", image_channels=1)
    assert isinstance(codec, PixelCodec) and codec.channels == 1 and codec.downsample == 1
    gray = torch.rand(2, 1, 28, 28)
    assert codec.encode(gray) is gray and codec.decode(gray) is gray
    assert codec.latent_shape(28, 28) == (1, 28, 28)
    assert codec.latent_shape(3, 32, 16) == (3, 32, 16)


def test_autoencoder_kl_round_trips_shapes(tmp_path):
    codec = load_codec(str(tiny_kl(tmp_path / "kl")))
    assert (codec.kind, codec.channels, codec.downsample, codec.scaling_factor) == ("kl", 4, 2, 0.18215)
    assert codec.latent_shape(32, 48) == codec.latent_shape(3, 32, 48) == (4, 16, 24)
    x = images()
    latents = codec.encode(x)
    assert latents.shape == (2, 4, 16, 24) and latents.dtype == torch.float32
    decoded = codec.decode(latents)
    assert decoded.shape == x.shape and decoded.abs().max() <= 1
    posterior_sample = codec.vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(3))
    torch.testing.assert_close(codec.encode(x, torch.Generator().manual_seed(3)), posterior_sample * 0.18215)


def test_posterior_mean_is_deterministic_and_scaled(tmp_path):
    codec = load_codec(str(tiny_kl(tmp_path / "kl")), kind="kl", sample_posterior=False)
    x = images()
    mean = codec.vae.encode(x).latent_dist.mode()
    torch.testing.assert_close(codec.encode(x), mean * 0.18215)
    assert not torch.equal(load_codec(str(tmp_path / "kl")).encode(x), codec.encode(x))


def test_autoencoder_dc_round_trips_shapes(tmp_path):
    codec = load_codec(str(tiny_dc(tmp_path / "dc")))
    assert (codec.kind, codec.channels, codec.downsample, codec.scaling_factor) == ("dc", 8, 2, 0.41407)
    x = images()
    latents = codec.encode(x)
    assert latents.shape == (2, *codec.latent_shape(32, 48))
    assert codec.decode(latents).shape == x.shape


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")  # inside diffusers
def test_missing_codecs_fail_with_one_clear_line(tmp_path):
    cases = {
        "stabilityai/no-such-vae": "not a local path and not in the Hugging Face cache",
        "./no/such/dir": "does not exist",
        str(tmp_path): "has no config.json",
    }
    for name, fragment in cases.items():
        with pytest.raises(CodecError) as info:
            load_codec(name)
        message = str(info.value)
        assert fragment in message and name in message and "\n" not in message
        assert info.value.__cause__ is None  # and no chained hub traceback:
        assert info.value.__context__ is None or info.value.__suppress_context__


def test_size_and_channel_mismatches_are_errors(tmp_path):
    codec = load_codec(str(tiny_kl(tmp_path / "kl")))
    with pytest.raises(CodecError, match="divisible by 2"):
        codec.latent_shape(31, 32)
    with pytest.raises(CodecError, match="3-channel images, got 1"):
        codec.latent_shape(1, 32, 32)
    with pytest.raises(CodecError, match="kind 'vq'"):
        load_codec(str(tmp_path / "kl"), kind="vq")
