"""`tim-ray import`: a state dict laid out as the official TiM's (names and shapes written out here from spec §4,
not taken from tim-ray's model), in every file format, imports into an export whose samples equal, bit for bit,
those of the network built with the official behaviour and loaded directly; a crafted pickle never runs; bad
input is one line."""
import dataclasses
import json
import pickle
import shutil
import time

import pytest
import torch
import yaml
from eval_fixtures import CodeRunningPickle, write_checkpoint
from safetensors.torch import load_file, save_file
from test_models_codecs import tiny_kl

from tim_ray.artifacts.export import load_for_inference
from tim_ray.cli import main
from tim_ray.config import SampleConfig
from tim_ray.eval.generate import ImagePipeline, sample_images
from tim_ray.models.tim import TiM
from tim_ray.transition.paths import get_path

# tim-tiny: width 32, 2 blocks, 2 heads of 16, patch 2, adaLN hidden 16, REPA after block 1 (projector 64 wide)
D, DEPTH, HEADS, PATCH, LORA, PROJ = 32, 2, 2, 2, 16, 64
CHANNELS, CLASSES, TEXT_DIM, Z_DIM = 3, 10, 16, 8


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing is found there


def _swiglu(prefix, inp, hidden, out):
    return {f"{prefix}.fc1_g.weight": (hidden, inp), f"{prefix}.fc1_g.bias": (hidden,),
            f"{prefix}.fc1_x.weight": (hidden, inp), f"{prefix}.fc1_x.bias": (hidden,),
            f"{prefix}.fc2.weight": (out, hidden), f"{prefix}.fc2.bias": (out,)}


def official_shapes(conditioning: str) -> dict[str, tuple]:
    text = conditioning == "text"
    shapes = {"x_embedder.proj.weight": (D, CHANNELS, PATCH, PATCH), "x_embedder.proj.bias": (D,)}
    for embedder in ("t_embedder", "delta_embedder"):
        shapes |= {f"{embedder}.mlp.0.weight": (D, 256), f"{embedder}.mlp.0.bias": (D,),
                   f"{embedder}.mlp.2.weight": (D, D), f"{embedder}.mlp.2.bias": (D,)}
    if text:
        shapes |= {"y_embedder.norm.weight": (TEXT_DIM,), "y_embedder.norm.bias": (TEXT_DIM,),
                   **_swiglu("y_embedder.mlp", TEXT_DIM, 4 * D, D)}
    else:
        shapes["y_embedder.embedding_table.weight"] = (CLASSES + 1, D)
    head = D // HEADS
    for i in range(DEPTH):
        b = f"blocks.{i}"
        shapes |= {f"{b}.attn.qkv.weight": (3 * D, D), f"{b}.attn.qkv.bias": (3 * D,),
                   f"{b}.attn.qkv_d.weight": (3 * D, D), f"{b}.attn.proj.weight": (D, D), f"{b}.attn.proj.bias": (D,)}
        norms = ("attn", "cross_attn") if text else ("attn",)
        shapes |= {f"{b}.{a}.{n}.{p}": (head,) for a in norms for n in ("q_norm", "k_norm") for p in ("weight", "bias")}
        if text:
            shapes |= {f"{b}.cross_attn.q.weight": (D, D), f"{b}.cross_attn.q.bias": (D,),
                       f"{b}.cross_attn.kv.weight": (2 * D, D), f"{b}.cross_attn.kv.bias": (2 * D,),
                       f"{b}.cross_attn.proj.weight": (D, D), f"{b}.cross_attn.proj.bias": (D,)}
        shapes |= _swiglu(f"{b}.mlp", D, 4 * D * 2 // 3, D)
        shapes |= _swiglu(f"{b}.adaLN_modulation", D, LORA, (9 if text else 6) * D)
    shapes |= {"projector.0.weight": (PROJ, D), "projector.0.bias": (PROJ,), "projector.2.weight": (PROJ, PROJ),
               "projector.2.bias": (PROJ,), "projector.4.weight": (Z_DIM, PROJ), "projector.4.bias": (Z_DIM,)}
    shapes |= {"final_layer.linear.weight": (PATCH * PATCH * CHANNELS, D),
               "final_layer.linear.bias": (PATCH * PATCH * CHANNELS,),
               **_swiglu("final_layer.adaLN_modulation", D, D // 2, 2 * D)}
    return shapes


def official_state_dict(conditioning: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights (no zero gates: every tensor shapes the output) with the official names and shapes."""
    generator = torch.Generator().manual_seed(seed)
    return {name: 0.2 * torch.randn(shape, generator=generator) for name, shape in official_shapes(conditioning).items()}


def official_yaml(path, conditioning: str):
    text = conditioning == "text"
    params = {"input_size": 4, "patch_size": PATCH, "in_channels": CHANNELS, "depth": DEPTH, "hidden_size": D,
              "num_heads": HEADS, "encoder_depth": 1, "lora_hidden_size": LORA, "z_dim": Z_DIM,
              **({"cap_feat_dim": TEXT_DIM} if text else {"num_classes": CLASSES, "class_dropout_prob": 0.1})}
    tree = {"model": {"transport": {"target": "tim.schedulers.transports.OT_FM",
                                    "params": {"P_mean": -0.4, "P_std": 1.0, "sigma_d": 1.0}},
                      "unified_dcm_loss": {"diffusion_ratio": 0.5, "consistency_ratio": 0.1,
                                           "derivative_type": "dde", "differential_epsilon": 0.005,
                                           "weight_time_type": "sqrt", "weight_time_tangent": True},
                      "network": {"target": f"tim.models.{'t2i' if text else 'c2i'}.tim_model.TiM", "params": params},
                      "vae_dir": "stabilityai/sd-vae-ft-ema", "ema_decay": 0.9999,
                      **({"text_encoder_dir": "google/gemma-3-1b-it", "max_seq_length": 8} if text else {})},
            "training": {"learning_rate": 1e-4, "learning_rate_base_batch_size": 256, "max_train_steps": 750000,
                         "optimizer": {"params": {"betas": [0.9, 0.95], "weight_decay": 0.01, "eps": 1e-6}}}}
    path.write_text(yaml.safe_dump(tree))
    return path


def original_model(conditioning: str, state: dict) -> TiM:
    """The network with the official behaviour (RoPE grid, no caption mask), loaded directly with strict=True."""
    model = TiM(in_channels=CHANNELS, hidden_size=D, depth=DEPTH, num_heads=HEADS, patch_size=PATCH,
                adaln_hidden_size=LORA, encoder_depth=1, conditioning=conditioning, num_classes=CLASSES,
                text_dim=TEXT_DIM, repa_dim=Z_DIM, projector_dim=PROJ, rope_grid="official",
                cross_attention_mask=False)
    model.load_state_dict(state, strict=True)
    return model.eval()


def conditions(conditioning: str):
    if conditioning == "class":
        labels = torch.tensor([0, 3, 9])
        return {"y": labels}, {"y": torch.full_like(labels, CLASSES)}
    generator = torch.Generator().manual_seed(5)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3, [True] + [False] * 5])
    return ({"context": torch.randn(3, 6, TEXT_DIM, generator=generator), "context_mask": mask},
            {"context": torch.randn(3, 6, TEXT_DIM, generator=generator), "context_mask": mask[:, :1].expand(3, 6)})


def draw(model, conditioning: str, settings: SampleConfig) -> torch.Tensor:
    cond, uncond = conditions(conditioning)
    noise = torch.randn(3, CHANNELS, 4, 8, generator=torch.Generator().manual_seed(1))  # non-square: RoPE grid
    return sample_images(model, cond, uncond, noise, settings.nfe, get_path("otfm"), settings, seed=0)


def write(state: dict, path):
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    return path


def run_import(*args) -> int:
    return main(["import", *map(str, args)])


@pytest.mark.parametrize("conditioning", ["class", "text"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_an_import_samples_exactly_as_the_original(tmp_path, conditioning, suffix):
    state = official_state_dict(conditioning)
    source = write(state, tmp_path / f"tim{suffix}")
    out = tmp_path / "export"
    assert run_import(source, "--out", out, "--config", official_yaml(tmp_path / "c.yaml", conditioning)) == 0

    loaded = load_for_inference(out)
    cfg = loaded.config
    assert (cfg.model.rope_grid, cfg.model.cross_attention_mask, cfg.sample.guide_first_step) == \
        ("official", False, False)
    assert (cfg.model.arch, cfg.model.codec, cfg.model.repa_dim, cfg.transition.p_mean) == \
        ("tim-tiny", "stabilityai/sd-vae-ft-ema", 0, -0.4)
    toml = (out / "config.toml").read_text()
    assert 'rope_grid = "official"  # the released network' in toml and "guide_first_step = false  # " in toml
    assert not any(k.startswith("projector.") for k in load_file(out / "model.safetensors"))

    # CFG 2 on a non-square grid with padded captions: each compat key changes the result if it is wrong
    settings = SampleConfig(nfe=2, cfg_scale=2.0, cfg_interval=[0.0, 1.0], guide_first_step=False)
    expected = draw(original_model(conditioning, state), conditioning, settings)
    imported = draw(loaded.model, conditioning, dataclasses.replace(cfg.sample, nfe=2, cfg_scale=2.0))
    assert torch.equal(imported, expected)
    wrong = draw(loaded.model, conditioning, dataclasses.replace(settings, guide_first_step=True))
    assert not torch.equal(wrong, expected)


def test_sample_cli_works_on_an_import_and_the_projector_is_kept_on_request(tmp_path, capsys):
    source = write(official_state_dict("class"), tmp_path / "tim.safetensors")
    out = tmp_path / "export"
    assert run_import(source, "--out", out, "--arch", "tim-tiny", "--keep-projector", "model.codec=pixel",
                      "data.height=8", "data.width=8") == 0
    info = json.loads((out / "export.json").read_text())
    assert info["weights"] == "ema" and info["source"] == str(source) and len(info["imported"]["sha256"]) == 64
    loaded = load_for_inference(out)
    assert loaded.config.model.num_classes == CLASSES and loaded.config.model.repa_dim == Z_DIM
    assert main(["sample", str(out), "--class", "3", "--nfe", "1", "--out", str(tmp_path / "s")]) == 0
    assert "1 images of 8x8" in capsys.readouterr().out


def test_ema_or_trained_weights_are_picked_from_a_file_with_both(tmp_path):
    ema, trained = official_state_dict("class", seed=1), official_state_dict("class", seed=2)
    source = tmp_path / "both.pt"
    torch.save({"ema": ema, "model": trained, "step": 10}, source)
    for flag, expected, weights in [((), ema, "ema"), (("--no-ema",), trained, "model")]:
        out = tmp_path / f"export-{weights}"
        assert run_import(source, "--out", out, "--arch", "tim-tiny", *flag) == 0
        tensors = load_file(out / "model.safetensors")
        assert torch.equal(tensors["blocks.0.attn.qkv.weight"], expected["blocks.0.attn.qkv.weight"])
        assert json.loads((out / "export.json").read_text())["weights"] == weights


def test_a_crafted_pickle_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    source = tmp_path / "t2i_model.bin"
    state = official_state_dict("class")
    torch.save({**state, "x_embedder.proj.bias": CodeRunningPickle(str(marker))}, source)
    (tmp_path / "raw.bin").write_bytes(pickle.dumps(CodeRunningPickle(str(marker))))
    for path in (source, tmp_path / "raw.bin"):
        assert run_import(path, "--out", tmp_path / "export", "--arch", "tim-tiny") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "refusing" in err and "could run code" in err
    assert not marker.exists() and not (tmp_path / "export").exists()


def test_a_state_dict_that_does_not_fit_names_the_keys(tmp_path, capsys):
    state = official_state_dict("class")
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.0.attn.qkv.weight"] = torch.zeros(5, D)
    state["blocks.0.extra.weight"] = torch.zeros(1)
    assert run_import(write(state, tmp_path / "w.safetensors"), "--out", tmp_path / "e", "--arch", "tim-tiny") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "missing: blocks.1.mlp.fc2.bias" in err and "unexpected: blocks.0.extra.weight" in err
    assert "shape mismatch: blocks.0.attn.qkv.weight (5, 32) (model: (96, 32))" in err


def test_a_hub_id_without_a_hub_fails_at_once_in_one_line(tmp_path, capsys):
    started = time.monotonic()
    assert run_import("GoodEnough/TiM-C2I/c2i_model_256.safetensors", "--out", tmp_path / "e") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not in the Hugging Face cache" in err and time.monotonic() - started < 10
    assert run_import("GoodEnough/TiM-C2I", "--out", tmp_path / "e") == 2  # two releases there: name one
    assert "c2i_model_512.safetensors" in capsys.readouterr().err
    assert run_import(tmp_path / "nothing.bin", "--out", tmp_path / "e") == 2
    assert "does not exist" in capsys.readouterr().err


def test_an_export_keeps_working_when_it_and_its_codec_directory_move(tmp_path):
    """A local codec is copied into the export: moving the export, and the codec's own directory, breaks nothing."""
    vae = tiny_kl(tmp_path / "vae")  # 4 latent channels, downsampling 2
    state = {k: v for k, v in official_state_dict("class").items()}
    state["x_embedder.proj.weight"] = torch.randn(D, 4, PATCH, PATCH)
    state["final_layer.linear.weight"] = torch.randn(PATCH * PATCH * 4, D)
    state["final_layer.linear.bias"] = torch.randn(PATCH * PATCH * 4)
    out = tmp_path / "export"
    assert run_import(write(state, tmp_path / "w.safetensors"), "--out", out, "--arch", "tim-tiny",
                      f"model.codec={vae}", "data.height=8", "data.width=8") == 0
    assert 'codec = "./codec"' in (out / "config.toml").read_text()
    shutil.move(vae, tmp_path / "vae-moved")
    moved = shutil.move(out, tmp_path / "elsewhere")
    pipeline = ImagePipeline.open(moved, device="cpu")
    assert pipeline.codec.channels == 4 and str(moved) in pipeline.config.model.codec
    cond, uncond = pipeline.conditions(labels=[1])
    images = pipeline.generate(cond, uncond, pipeline.noise(1, 8, 8, seed=0), 1, pipeline.config.sample)
    assert images.shape == (1, 3, 8, 8)


@pytest.mark.ray
def test_train_init_from_an_export_starts_at_step_0_from_its_weights_and_publishes_its_export(tmp_path):
    """One tiny CLI run: the network starts from the export's EMA weights (lr 1e-12 leaves them in place), at step
    0 with a fresh optimizer; MLflow records the source, and the run's own export is logged and registered."""
    import ray
    from mlflow.tracking import MlflowClient

    from tim_ray.artifacts.export import export_checkpoint

    source = export_checkpoint(write_checkpoint(tmp_path / "old", step=7), tmp_path / "source", ema=True)
    try:
        code = main(["train", "--init-from", str(source), "model.arch=tim-tiny", "model.conditioning=class",
                     "data.max_samples=64", "data.height=16", "data.width=16", "train.batch_size=4",
                     "train.steps=1", "train.eval_every=1", "checkpoint.every=1", "eval.nfe=[1]", "optim.lr=1e-12",
                     f"train.output_dir={tmp_path}", "train.name=tuned", "tracking.registered_model=tiny"])
    finally:
        ray.shutdown()
    assert code == 0
    run_dir = tmp_path / "tuned"
    tuned = load_for_inference(run_dir / "checkpoint_00000001")
    assert tuned.state.step == 1
    for name, tensor in load_for_inference(source).model.state_dict().items():
        torch.testing.assert_close(tuned.model.state_dict()[name], tensor, rtol=0, atol=1e-8)

    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.data.tags["tim_ray.init_from"] == str(source) and run.data.tags["tim_ray.init_weights"] == "ema"
    assert "export" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert [v.run_id for v in client.search_model_versions("name = 'tiny'")] == [run.info.run_id]
    assert load_for_inference(run_dir / "export" / "step_0000001").state.step == 1
