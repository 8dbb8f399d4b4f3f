"""Where things live: URIs, local paths and hub ids, and models copied from a URI to a node."""

from pathlib import Path

import pytest

from dolly_ray import models, storage
from dolly_ray.generate.generator import GenerationParams, InstructionGenerator


def test_uris_local_paths_and_hub_ids():
    assert storage.is_hub_id("tatsu-lab/alpaca") and storage.is_hub_id("databricks/databricks-dolly-15k")
    assert not storage.is_hub_id("s3://bucket/alpaca.parquet")
    assert not storage.is_hub_id("missing/records.jsonl")
    assert storage.is_local_path("./model") and storage.is_local_path("/no/such/dir") and storage.is_local_path("~/runs")
    assert not storage.is_local_path("EleutherAI/gpt-j-6B") and not storage.is_local_path("s3://bucket/hf")
    assert storage.absolute("s3://bucket/runs") == "s3://bucket/runs" and storage.absolute("runs").startswith("/")


def test_a_model_on_remote_storage_is_fetched_once_then_loaded(tiny_model_dir, tmp_path, monkeypatch):
    # file:// goes through the same pyarrow filesystem copy as s3:// or gs://.
    monkeypatch.setattr("dolly_ray.storage.MODEL_CACHE", str(tmp_path / "cache"))
    uri = Path(tiny_model_dir).resolve().as_uri()
    remote = InstructionGenerator.from_pretrained(uri, device="cpu")
    local = InstructionGenerator.from_pretrained(tiny_model_dir, device="cpu")
    params = GenerationParams(greedy=True, max_new_tokens=6)
    assert remote.generate(["Say hi"], params) == local.generate(["Say hi"], params)
    (cached,) = (tmp_path / "cache").iterdir()
    assert sorted(p.name for p in cached.iterdir()) == sorted(p.name for p in Path(tiny_model_dir).iterdir())
    assert storage.local_model_dir(uri) == str(cached)  # no second copy
    assert storage.local_model_dir(tiny_model_dir) == tiny_model_dir


def test_a_driver_checks_a_remote_model_without_fetching_its_weights(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("dolly_ray.storage.MODEL_CACHE", str(tmp_path / "cache"))
    uri = Path(tiny_model_dir).resolve().as_uri()
    models.check_loadable_model(uri, max_new_tokens=16)
    (config_only,) = (tmp_path / "cache").iterdir()
    assert (config_only / "config.json").is_file() and not list(config_only.glob("*.safetensors"))
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        models.check_loadable_model(uri, max_new_tokens=100_000)
    with pytest.raises(ValueError, match="cannot load model"):
        models.check_loadable_model((tmp_path / "absent").as_uri())


def test_paths_inside_a_filesystem_are_reported_as_the_uris_jobs_take_back():
    # What Ray Train and pyarrow report for a checkpoint (the scheme stripped), back as a location.
    assert storage.uri_in("runs/dolly/a/checkpoint_1", "s3://runs/dolly") == "s3://runs/dolly/a/checkpoint_1"
    assert storage.uri_in("bucket/x", "gs://bucket/y?project=p") == "gs://bucket/x?project=p"
    assert storage.uri_in("/tmp/runs/a", "file:///tmp/runs") == "file:///tmp/runs/a"
    assert storage.uri_in("/home/me/runs/a", "/home/me/runs") == "/home/me/runs/a"
    assert storage.join("s3://runs/dolly/a", "hf") == "s3://runs/dolly/a/hf"
    assert storage.join("gs://b/tb/?project=p", "run") == "gs://b/tb/run?project=p"
    assert storage.join("/tmp/tb", "run", "x") == "/tmp/tb/run/x"


def test_a_directory_uploads_to_a_uri_and_reads_back(tmp_path):
    (tmp_path / "events").mkdir()
    (tmp_path / "events" / "a.txt").write_text("first")
    target = (tmp_path / "remote" / "tb").as_uri()
    storage.upload_dir(str(tmp_path / "events"), target)
    (tmp_path / "events" / "a.txt").write_text("second")  # a later upload overwrites
    storage.upload_dir(str(tmp_path / "events"), target)
    assert storage.read_text(storage.join(target, "a.txt")) == "second"
