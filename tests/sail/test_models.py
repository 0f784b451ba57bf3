"""sail/models.py: a hub model that is not on this machine stops with one line that says how to get it; the VAE's
precision is set without library noise in the logs."""
import os
import subprocess
import sys

from conftest import ROOT

SDXL = "stabilityai/stable-diffusion-xl-base-1.0"


def offline_env(tmp_path):
    """An empty Hugging Face cache, offline, and no local copy named for the presets."""
    env = {k: v for k, v in os.environ.items() if k not in ("SAIL_SD15_PATH", "SAIL_SDXL_PATH", "HF_HUB_CACHE")}
    return dict(env, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))


def missing_line(model, variable, tmp_path):
    return (f"{model} is not in the local Hugging Face cache ({tmp_path / 'hf' / 'hub'}) and cannot be fetched "
            f"(HF_HUB_OFFLINE is set): download it where there is a network with `hf download {model}` (into that "
            f"cache), or point ${variable} at a local copy of it")


def test_a_hub_model_missing_offline_says_how_to_get_it(tmp_path):
    code = """
from sail import models
from sail.common import SailError
for load in (lambda: models.describe_model("sdxl"), lambda: models.describe_model("stabilityai/stable-diffusion-xl-base-1.0"),
             lambda: models.load_unet(models.ModelDescription(SDXL, SDXL, "sdxl")),
             lambda: models.load_pipeline(models.ModelDescription(SD15, SD15, "sd15"), "cpu", None)):
    try:
        load()
    except SailError as err:
        print(err)
"""
    sd15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    done = subprocess.run([sys.executable, "-c", f"SDXL, SD15 = {SDXL!r}, {sd15!r}\n" + code], capture_output=True,
                          text=True, env=offline_env(tmp_path), timeout=300)
    assert done.returncode == 0, done.stderr
    sdxl_line = missing_line(SDXL, "SAIL_SDXL_PATH", tmp_path)
    assert done.stdout.splitlines() == [sdxl_line] * 3 + [missing_line(sd15, "SAIL_SD15_PATH", tmp_path)]
    assert "Warning" not in done.stderr, done.stderr


def test_a_hub_model_that_is_not_a_preset_names_a_local_copy(tmp_path):
    done = subprocess.run([sys.executable, "-c", "from sail import models; models.describe_model('someone/some-model')"],
                          capture_output=True, text=True, env=offline_env(tmp_path), timeout=300)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].endswith(
        "`hf download someone/some-model` (into that cache), or give the folder of a local copy instead")


def test_the_vae_precision_is_set_quietly(capfd):
    """diffusers warns about float32 modules on every VAE cast; the kit's casts are deliberate, and one that
    changes nothing is not made."""
    import torch

    from sail import models
    for arch, dtype, kwargs, vae_dtype in (("sd15", torch.float32, dict(encoding=True), torch.float32),
                                           ("sdxl", torch.bfloat16, dict(encoding=True), torch.float32),
                                           ("sd15", torch.bfloat16, dict(encoding=True, vae_fp32=True), torch.float32)):
        pipe = models.load_pipeline(models.describe_model(f"tiny-{arch}"), torch.device("cpu"), dtype, **kwargs)
        assert pipe.vae.dtype == vae_dtype
    assert "should be kept in float32" not in capfd.readouterr().err
