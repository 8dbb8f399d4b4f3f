"""Shared fixtures: a tiny GPT-J (and a tiny model of each family) on disk, project-made task files, and a local Ray."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from dolly_ray import testing
from dolly_ray.records import tasks


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised 2-layer GPT-J and its byte-level BPE tokenizer, saved like a hub model."""
    return str(testing.build_model(tmp_path_factory.mktemp("tiny-gptj")))


@pytest.fixture(scope="session")
def family_model_dir(tmp_path_factory):
    """``family_model_dir(family)``: a tiny model of that family (``testing.FAMILIES``) with
    the tests' tokenizer, built once per session on first use."""
    built: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in built:
            built[family] = str(testing.build_model(tmp_path_factory.mktemp(f"tiny-{family}"), family=family))
        return built[family]

    return get


@pytest.fixture(scope="session")
def generator(tiny_model_dir):
    """The tiny model loaded once for every test that compares against its answers."""
    from dolly_ray.generate.generator import InstructionGenerator

    return InstructionGenerator.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def task_records():
    return tasks.generate(60, seed=0)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session: starting Ray costs seconds each time.

    It keeps up to 8 idle worker processes (Ray's default: one per CPU), so the many
    short Ray Data pipelines the tests run back to back reuse workers instead of
    starting a process for each task.
    """
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _system_config={"num_workers_soft_limit": 8})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


# The reference run's LoRA settings and the prompts its samples answer.
REFERENCE_LORA = {"lora_r": 8, "lora_alpha": 16.0, "lora_dropout": 0.05}
REFERENCE_PROMPTS = [
    {"instruction": "Reverse the letters of the word.", "input": "ray"},
    {"instruction": "Name a primary color.", "input": ""},
    {"instruction": "Sort the numbers.", "input": "3 1 2"},
]


@pytest.fixture(scope="session")
def reference_run(ray_local, tmp_path_factory):
    """A tiny GPT-J run that the resume, worker-kill and LoRA tests interrupt, compare
    with and load: 2 epochs of 10 optimizer steps, packed, a checkpoint every 3 steps,
    eval loss and 6 held-out answers scored every 4, LoRA adapters with dropout (the
    output layer has a non-zero bias, as GPT-J-6B's has), and no parameter small enough
    for ZeRO-3 to keep whole on every rank (as none of a 6B model's embeddings is). Full
    fine-tuning's exact resume is the multinode and a10-preset tests'.
    ``config(name, **overrides)`` builds the same run under another name in ``storage``;
    ``summary`` is the uninterrupted run's (with TensorBoard logs under ``tensorboard``,
    and samples: its answers to ``prompts``); ``base`` the model it adapts."""
    import types

    from dolly_ray.train import recipe

    storage = tmp_path_factory.mktemp("reference")
    base = testing.build_model(storage / "base", head_bias_std=0.5)
    dataset = tasks.write_jsonl(tasks.generate(200, seed=5), storage / "tasks.jsonl")

    def config(name, **overrides):
        settings = dict(
            epochs=2, micro_batch_size=4, learning_rate=5e-3, warmup_steps=3, log_every=1, checkpoint_every=3,
            eval_every=4, eval_generate=6, eval_generate_max_new_tokens=12, **REFERENCE_LORA,
            deepspeed={"zero_optimization": {"stage3_param_persistence_threshold": 0}},  # every weight partitioned, as a 6B model's
        )  # fmt: skip
        return testing.cpu_train_config(base, dataset, storage, name, **{**settings, **overrides})

    tensorboard = storage / "tensorboard"
    summary = recipe.run(config("uninterrupted", tensorboard_dir=str(tensorboard), sample_prompts=REFERENCE_PROMPTS))
    return types.SimpleNamespace(
        config=config, storage=storage, summary=summary, tensorboard=tensorboard / "uninterrupted", base=str(base), prompts=REFERENCE_PROMPTS
    )


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
        if os.environ.get("CI"):  # CI lays shared/ beside the checkout: a missing file is a broken setup
            pytest.fail(f"shared data not found at {SHARED_DATA}")
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return os.path.abspath(SHARED_DATA)
