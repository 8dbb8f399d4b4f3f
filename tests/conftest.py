"""Shared fixtures: a tiny GPT-J on disk, project-made task files, and a local Ray."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from dolly_ray import tasks, testing  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised 2-layer GPT-J and its byte-level BPE tokenizer, saved like a hub model."""
    return str(testing.build_model(tmp_path_factory.mktemp("tiny-gptj")))


@pytest.fixture(scope="session")
def generator(tiny_model_dir):
    """The tiny model loaded once for every test that compares against its answers."""
    from dolly_ray.generation import InstructionGenerator

    return InstructionGenerator.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def task_records():
    return tasks.generate(60, seed=0)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session: starting Ray costs seconds each time."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def serve_http(ray_local):
    """Ray Serve's HTTP proxy on a free localhost port, for one test module; yields its URL.

    The module deploys its applications on it; they go when the module ends.
    """
    from ray import serve

    port = testing.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "alpaca_eval_davinci003.json")


@pytest.fixture(scope="session")
def shared_records_path():
    """Real instruction records kept beside the checkout (never copied into it)."""
    if not os.path.exists(SHARED_DATA):
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return os.path.abspath(SHARED_DATA)
