"""`make-test-model --controlnet-for MODEL`: a tiny depth ControlNet that fits a tiny model, so the project task
(and `make demo`) runs without downloaded weights."""

from __future__ import annotations

from diffusers import ControlNetModel

from backend import controlnets
from backend.__main__ import main
from backend.models import ModelManager
from sdtex_contract.protocol import model_params


def test_make_test_model_writes_a_controlnet_that_fits_the_model(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "tiny-controlnet"

    assert main(["make-test-model", str(folder), "--controlnet-for", str(tiny_model_dir)]) == 0

    assert capsys.readouterr().out.strip() == str(folder)
    model, _ = ModelManager().get(model_params({"model": str(tiny_model_dir)}))
    controlnets.check_fits(ControlNetModel.from_pretrained(folder), model.pipe, str(folder), str(tiny_model_dir))
    assert list(folder.glob("*.safetensors"))


def test_a_controlnet_for_a_folder_that_is_no_model_is_refused(tmp_path, capsys):
    assert main(["make-test-model", str(tmp_path / "cn"), "--controlnet-for", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --controlnet-for: {tmp_path} is not a model folder")
    assert not (tmp_path / "cn").exists()


def test_a_controlnet_for_an_inpainting_model_is_refused(tmp_path, capsys):
    from backend.tiny_model import make_test_model

    model = make_test_model(tmp_path / "m", architecture="tiny-inpaint")
    assert main(["make-test-model", str(tmp_path / "cn"), "--controlnet-for", str(model)]) == 2
    assert "U-Net takes 9 channels" in capsys.readouterr().err
