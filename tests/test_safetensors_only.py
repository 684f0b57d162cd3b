"""Only safetensors weights load: a teacher or CLIP-metrics folder holding pickle checkpoints only is
refused with an error naming the folder (a pickle can run code when loaded)."""

from __future__ import annotations

import pytest
import torch

from imix2mix.errors import MissingWeightsError
from imix2mix.metrics import ClipMetricsModel
from imix2mix.presets import MetricsClipArchitecture, TeacherArchitecture, build_random_metrics_clip, build_random_teacher_pipeline
from imix2mix.teachers.ip2p import InstructPix2PixTeacher


def test_an_ip2p_family_checkpoint_loads_by_path_and_a_pickle_one_is_refused(tmp_path):
    pipeline = build_random_teacher_pipeline(TeacherArchitecture.tiny(), seed=5)
    pipeline.save_pretrained(tmp_path / "editor")  # safetensors
    loaded = InstructPix2PixTeacher.from_pretrained(tmp_path / "editor")
    torch.testing.assert_close(loaded.unet.conv_in.weight, pipeline.unet.conv_in.weight)

    pipeline.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert list((tmp_path / "pickled" / "unet").glob("*.bin")) and not list((tmp_path / "pickled" / "unet").glob("*.safetensors"))
    with pytest.raises(MissingWeightsError, match="pickled.*safetensors"):
        InstructPix2PixTeacher.from_pretrained(tmp_path / "pickled")


def test_a_clip_metrics_folder_with_a_pickle_checkpoint_is_refused(tmp_path):
    clip = build_random_metrics_clip(MetricsClipArchitecture.tiny())
    folder = tmp_path / "clip_pickled"
    clip.model.save_pretrained(folder)
    clip.tokenizer.save_pretrained(folder)
    # transformers writes safetensors whatever it is told: make the pickle-only folder by hand
    (folder / "model.safetensors").unlink()
    torch.save(clip.model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(MissingWeightsError, match="clip_pickled.*safetensors"):
        ClipMetricsModel.from_pretrained(folder)
