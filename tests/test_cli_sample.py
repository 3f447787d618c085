"""`tim-ray sample` on tiny checkpoints: a PNG per image plus a grid, identical bytes for a seed, any size the
model takes, one-line errors for the wrong kind of condition or a size it cannot take."""
import json

import numpy as np
import pytest
from eval_fixtures import write_checkpoint
from PIL import Image

from tim_ray.cli import main


@pytest.fixture(scope="module")
def class_checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("class-run"))


def pngs(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.png"))}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path, class_checkpoint):
    args = ["sample", str(class_checkpoint), "--class", "1", "--class", "3", "--num", "2", "--nfe", "2"]
    assert main([*args, "--seed", "5", "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--seed", "5", "--out", str(tmp_path / "b")]) == 0
    assert main([*args, "--seed", "6", "--out", str(tmp_path / "c")]) == 0
    a, b = pngs(tmp_path / "a"), pngs(tmp_path / "b")
    assert sorted(a) == ["000_class-1.png", "001_class-3.png", "002_class-1.png", "003_class-3.png", "grid.png"]
    assert a == b
    for name in a:
        if name != "grid.png":
            assert not np.array_equal(np.asarray(Image.open(tmp_path / "a" / name)),
                                      np.asarray(Image.open(tmp_path / "c" / name))), name
    manifest = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert manifest["weights"] == "ema" and manifest["sample"]["seed"] == 5 and manifest["sample"]["nfe"] == 2
    assert [i["condition"] for i in manifest["images"]] == ["class 1", "class 3", "class 1", "class 3"]


def test_stochastic_sampling_is_reproducible_too(tmp_path, class_checkpoint):
    args = ["sample", str(class_checkpoint), "--class", "2", "--nfe", "4", "--seed", "1"]
    assert main([*args, "--stochasticity", "0.3", "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--stochasticity", "0.3", "--out", str(tmp_path / "b")]) == 0
    assert main([*args, "--stochasticity", "0", "--out", str(tmp_path / "c")]) == 0
    assert pngs(tmp_path / "a") == pngs(tmp_path / "b")
    assert pngs(tmp_path / "a") != pngs(tmp_path / "c")  # the injected noise changed something


def test_mode_diffusion_samples_with_euler_steps_and_is_recorded(tmp_path, class_checkpoint):
    args = ["sample", str(class_checkpoint), "--class", "2", "--nfe", "4", "--seed", "1"]
    assert main([*args, "--mode", "transition", "--out", str(tmp_path / "t")]) == 0
    assert main([*args, "--mode", "diffusion", "--out", str(tmp_path / "d")]) == 0
    assert main([*args, "--mode", "diffusion", "--out", str(tmp_path / "d2")]) == 0
    assert pngs(tmp_path / "d") == pngs(tmp_path / "d2")
    assert pngs(tmp_path / "t") != pngs(tmp_path / "d")  # r = t instead of r = the next time
    assert json.loads((tmp_path / "d" / "samples.json").read_text())["sample"]["mode"] == "diffusion"


def test_any_size_the_patch_grid_takes(tmp_path, class_checkpoint):
    assert main(["sample", str(class_checkpoint), "--class", "0", "--height", "12", "--width", "20",
                 "--out", str(tmp_path / "s")]) == 0
    image = Image.open(tmp_path / "s" / "000_class-0.png")
    assert image.size == (20, 12) and image.mode == "L"  # grey, like the one-channel model's data


@pytest.mark.parametrize("extra, message", [
    (["--prompt", "a cat"], "this checkpoint is class-conditional: give class labels (--class), not prompts"),
    (["--class", "10"], "class labels must be in [0, 9], got [10]"),
    (["--class", "0", "--height", "15"], "image size 15x16 does not fit this model: height and width must be "
                                         "positive multiples of 2"),
    (["--class", "0", "--cfg-interval", "0.9"], "--cfg-interval must be two numbers LO,HI, got '0.9'"),
    (["--class", "0", "--nfe", "0"], "sample.nfe must be > 0, got 0"),
    (["--class", "0", "--mode", "euler"], "sample.mode = 'euler' is not one of transition, diffusion"),
])
def test_bad_requests_are_one_line_usage_errors(tmp_path, class_checkpoint, capsys, extra, message):
    assert main(["sample", str(class_checkpoint), *extra, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tim-ray: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_text_model_takes_prompts_from_a_file_and_refuses_labels(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "run", conditioning="text")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a sneaker\n\na photo of a bag\n")
    assert main(["sample", str(checkpoint), "--prompts", str(prompts), "--nfe", "1", "--cfg", "1.5",
                 "--out", str(tmp_path / "s")]) == 0
    manifest = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert [i["condition"] for i in manifest["images"]] == ["a photo of a sneaker", "a photo of a bag"]
    assert manifest["sample"]["cfg_scale"] == 1.5
    capsys.readouterr()
    assert main(["sample", str(checkpoint), "--class", "1", "--out", str(tmp_path / "t")]) == 2
    assert capsys.readouterr().err == ("tim-ray: error: this checkpoint is text-conditional: give prompts "
                                       "(--prompt/--prompts), not class labels\n")
