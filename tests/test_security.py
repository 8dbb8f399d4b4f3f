"""Safe loading defaults: safetensors only unless allowed, no remote code unless trusted.

Every entry point (the generator, training, the batch job, Serve) refuses on its
driver, before Ray or any worker starts.
"""

import json
import shutil

import pytest
import torch

from dolly_ray import models
from dolly_ray.batch import generation
from dolly_ray.batch.config import BatchConfig
from dolly_ray.cli import ConfigError
from dolly_ray.generate.generator import GenerationParams, InstructionGenerator
from dolly_ray.serve import server as dolly_serve
from dolly_ray.train import recipe


def _pickle_only_copy(model_dir, path):
    from transformers import AutoModelForCausalLM

    shutil.copytree(model_dir, path)
    torch.save(AutoModelForCausalLM.from_pretrained(model_dir).state_dict(), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    return str(path)


def test_pickle_weights_are_refused_everywhere_unless_allowed(tiny_model_dir, tmp_path):
    pickled = _pickle_only_copy(tiny_model_dir, tmp_path / "pickled")
    with pytest.raises(OSError):
        InstructionGenerator.from_pretrained(pickled)
    config = recipe.TrainConfig(model=pickled, dataset="unused.jsonl", preset="cpu")
    with pytest.raises(ValueError, match="no safetensors weights.*--allow-pickle"):
        recipe.run(config)  # refused on the driver, before any data or worker
    with pytest.raises(ConfigError, match="no safetensors weights.*--allow-pickle"):
        generation.check(BatchConfig(model=pickled, input=tiny_model_dir, output=str(tmp_path / "out.jsonl")))
    with pytest.raises(ConfigError, match="no safetensors weights"):
        dolly_serve.app_builder({"model": pickled})

    models.check_loadable_model(pickled, allow_pickle=True)
    generation.check(BatchConfig(model=pickled, input=tiny_model_dir, output=str(tmp_path / "out.jsonl"), allow_pickle=True))
    generator = InstructionGenerator.from_pretrained(pickled, allow_pickle=True)
    assert generator.generate(["Say hi"], GenerationParams(greedy=True, max_new_tokens=2))[0].num_generated_tokens >= 1
    InstructionGenerator.from_pretrained(tiny_model_dir, allow_pickle=True)  # safetensors still load


CUSTOM_CODE = """
from transformers import GPTJConfig, GPTJForCausalLM

open({marker!r}, "w").write("custom code ran")


class CustomConfig(GPTJConfig):
    model_type = "dolly_ray_custom"


class CustomModel(GPTJForCausalLM):
    config_class = CustomConfig
"""


def _custom_code_copy(model_dir, path, marker, model_type):
    shutil.copytree(model_dir, path)
    (path / "custom_code.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "custom_code.CustomConfig", "AutoModelForCausalLM": "custom_code.CustomModel"}
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_remote_code_is_refused_without_trust_remote_code(tiny_model_dir, tmp_path):
    marker = tmp_path / "code_ran"
    custom = _custom_code_copy(tiny_model_dir, tmp_path / "custom", marker, "dolly_ray_custom")
    with pytest.raises(ValueError, match="trust_remote_code"):
        InstructionGenerator.from_pretrained(custom)
    with pytest.raises(ValueError, match="cannot load model.*custom code"):
        recipe.run(recipe.TrainConfig(model=custom, dataset="unused.jsonl", preset="cpu"))
    with pytest.raises(ConfigError, match="cannot load model.*custom code"):
        generation.check(BatchConfig(model=custom, input=tiny_model_dir, output=str(tmp_path / "out.jsonl")))
    # A known model type with custom code beside it loads the built-in class instead.
    known = _custom_code_copy(tiny_model_dir, tmp_path / "known", marker, "gptj")
    assert type(InstructionGenerator.from_pretrained(known).model).__name__ == "GPTJForCausalLM"
    assert not marker.exists()  # no custom code ran on the way

    generator = InstructionGenerator.from_pretrained(custom, trust_remote_code=True)
    assert type(generator.model).__name__ == "CustomModel" and marker.exists()  # the flag is what lets it run
