"""Tiny local stand-ins for tests, benchmarks and the demo: models of each family and a tokenizer, an
S3-compatible server, and Ray clusters of hand-started nodes.

The model and tokenizer are written with ``save_pretrained`` so every code path loads
them with ``from_pretrained(path)`` exactly as it would load ``EleutherAI/gpt-j-6B``;
nothing here touches the network.
"""

from __future__ import annotations

import collections
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from dolly_ray import prompts
from dolly_ray.records import tasks

EOS_TOKEN = "<|endoftext|>"
REPO = Path(__file__).resolve().parent.parent  # jobs are submitted from the checkout


def build_tokenizer(path: str | Path, vocab_size: int = 400, corpus: list[str] | None = None):
    """Train a byte-level BPE tokenizer on the prompt template and task phrasings.

    Like GPT-J's, it has an eos token, no pad token and none of the prompt keys: the
    project adds those itself. Merges come from the fixed wording, so the random words
    inside tasks stay close to one token per letter, which a tiny model can learn from.
    An extra ``corpus`` (real English, say) gives GPT-J-like compression instead.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    wording = [text.format_map(collections.defaultdict(str)) for text in tasks.WORDING.values()]
    corpus = list(corpus or []) + ([prompts.INTRO_BLURB, prompts.INPUT_KEY] + wording) * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=2048,
    )
    tokenizer.save_pretrained(str(path))
    return tokenizer


def english_corpus(records: list[dict]) -> list[str]:
    """The text of instruction records (instruction, input if any, output): trained on
    it, ``build_tokenizer`` spends about as many tokens on English as GPT-J's does."""
    return ["\n".join(r[key] for key in ("instruction", "input", "output") if r.get(key)) for r in records]


# Tiny configs of the families people fine-tune: (config class, its own field names for
# the shape). Llama, Mistral and Qwen2 use grouped-query attention here (half the heads
# for keys and values) and no spare embedding rows, so adding the prompt keys resizes
# them; Qwen2 ties its input and output embeddings, as Qwen2-0.5B does.
FAMILIES = ("gptj", "gpt_neox", "llama", "mistral", "qwen2")
# Shorter than the longest task records, so that Mistral's sliding window really slides,
# and longer than their prompts, so that an answer could see into the record packed
# before it if packing leaked.
MISTRAL_SLIDING_WINDOW = 48


def build_model(
    path: str | Path,
    *,
    family: str = "gptj",
    n_layer: int = 2,
    n_embd: int = 64,
    head_dim: int = 32,
    n_positions: int = 2048,
    vocab_size: int = 512,
    seed: int = 0,
    tokenizer_corpus: list[str] | None = None,
    tokenizer_vocab_size: int = 400,
    head_bias_std: float = 0.0,
) -> Path:
    """Write a randomly initialised model of ``family`` and a tiny tokenizer to ``path`` (safetensors).

    ``tokenizer_corpus`` and ``tokenizer_vocab_size`` go to ``build_tokenizer``. A
    ``head_bias_std`` draws the output layer's bias (GPT-J's has one, trained to non-zero
    in GPT-J-6B; a new model's starts at zero). Like
    GPT-J's and Pythia's, their embeddings have spare rows for the prompt keys the
    project adds (``vocab_size``); the Llama-style ones have exactly the tokenizer's rows.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer(path, vocab_size=tokenizer_vocab_size, corpus=tokenizer_corpus)
    config = model_config(family, len(tokenizer), n_layer=n_layer, n_embd=n_embd, head_dim=head_dim, n_positions=n_positions, vocab_size=vocab_size, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if head_bias_std:
        with torch.no_grad():
            model.get_output_embeddings().bias.normal_(0, head_bias_std)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def model_config(family: str, tokenizer_size: int, *, n_layer: int, n_embd: int, head_dim: int, n_positions: int, vocab_size: int, eos_token_id: int | None = None):
    """The transformers config of a tiny ``family`` model (see ``FAMILIES``), beginning and
    ending sequences with the tokenizer's ``eos_token_id``."""
    ids = {"bos_token_id": eos_token_id, "eos_token_id": eos_token_id}
    from transformers import GPTJConfig, GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config

    heads = n_embd // head_dim
    spare_rows = max(vocab_size, tokenizer_size + len(prompts.SPECIAL_TOKENS))
    if family == "gptj":
        return GPTJConfig(vocab_size=spare_rows, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=heads, rotary_dim=min(16, head_dim), **ids)
    if family == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=spare_rows, max_position_embeddings=n_positions, hidden_size=n_embd, num_hidden_layers=n_layer,
            num_attention_heads=heads, intermediate_size=4 * n_embd, rotary_pct=0.25, tie_word_embeddings=False, **ids,
        )
    llama_style = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    if family not in llama_style:
        raise ValueError(f"unknown model family {family!r}; choose from {', '.join(FAMILIES)}")
    config = llama_style[family](
        vocab_size=tokenizer_size, max_position_embeddings=n_positions, hidden_size=n_embd, num_hidden_layers=n_layer,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=head_dim, intermediate_size=3 * n_embd,
        tie_word_embeddings=family == "qwen2", **ids,
    )
    if family == "mistral":
        config.sliding_window = MISTRAL_SLIDING_WINDOW
    return config


def cpu_train_config(model: str | Path, dataset: str | Path, storage_path: str | Path, name: str, **overrides):
    """A TrainConfig for a tiny ZeRO-3 run on 2 local CPU workers.

    Each worker takes half a CPU so Ray Data keeps one on a 2-core machine; records are
    short, 10% are held out, and eval runs only at the end unless overridden.
    """
    from dolly_ray.train import recipe

    settings = dict(
        max_length=128, eval_fraction=0.1, eval_every=0, num_workers=2, cpus_per_worker=0.5, preset="cpu"
    )
    return recipe.TrainConfig(
        model=str(model), dataset=str(dataset), storage_path=str(storage_path), name=name, **{**settings, **overrides}
    )


def run_job_here(name: str, args: list[str]) -> subprocess.CompletedProcess:
    """``jobs/<name>.py`` with ``args``, under its own error handling but in this process,
    with what it printed, as ``subprocess.run`` reports it. For checks of flags, plans and
    one-line errors, where a new interpreter would cost seconds of imports per case."""
    import contextlib
    import importlib.util
    import io

    from dolly_ray import cli

    spec = importlib.util.spec_from_file_location(f"jobs_{name}", REPO / "jobs" / f"{name}.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    stdout, stderr, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = [f"jobs/{name}.py", *args]
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            cli.run_main(job.main)
        status = 0
    except SystemExit as e:
        status = e.code
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess([f"jobs/{name}.py", *args], status, stdout.getvalue(), stderr.getvalue())


# Ports a Ray node takes by default (GCS, dashboard, its agent, client server, Serve):
# free now, they may be taken by a Ray that starts after the port is chosen.
RAY_DEFAULT_PORTS = {6379, 8000, 8265, 10001, 52365}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (and no Ray takes by default)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in RAY_DEFAULT_PORTS:
            return port


class S3Server:
    """An S3-compatible server on 127.0.0.1 (moto's server mode, a real HTTP server speaking
    the S3 protocol), reached the way users reach MinIO: through the standard AWS variables
    in ``env``. Stop it with ``stop()``; its buckets live in its memory."""

    def __init__(self):
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        server = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
        self.process = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=2)
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the S3 server on {self.endpoint} did not start")
                time.sleep(0.2)

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        )

    def create_bucket(self, name: str) -> str:
        """Create ``name``; returns its ``s3://`` URI."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key in ``bucket`` under ``prefix``."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def job_summary(logs: str) -> dict:
    """The JSON summary a job prints last, which must be a whole line of the combined log
    with nothing after it."""
    lines = [line for line in logs.splitlines() if line.strip()]
    assert lines[-1].startswith("{") and "\x1b" not in lines[-1], lines[-3:]
    return json.loads(lines[-1])


class RayCluster:
    """A Ray cluster of hand-started nodes on 127.0.0.1, as `ray start` builds one on real
    machines: a head (``ray start --head``) and worker nodes joined by ``add_node``.

    Each node has its own Ray temp dir, temp dir for files (``TMPDIR``) and working
    directory, so what a node keeps for itself shows up in its own folders. ``env`` (the
    S3 variables, say) reaches every node, as a cluster's setup would set it. Jobs are
    submitted with the ``ray job`` CLI, as users submit them. The cluster's auth token
    lives in ``env``, as after ``ray get-auth-token``.
    """

    def __init__(self, root: Path, *, head_cpus: int, env: dict[str, str] | None = None, head_env: dict[str, str] | None = None):
        self.root = Path(root)
        self.port = free_port()
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        self.env.update(
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=secrets.token_hex(16),
            **(env or {}),
        )
        self.nodes: list[RayNode] = []
        head_flags = [
            "--head", "--port", str(self.port),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
        ]  # fmt: skip
        self.head = self._start("head", head_cpus, head_flags, head_env or {})
        self._wait(lambda: self.ray_job("list").returncode == 0 and self.alive_node_ids(), self.head, "the head node did not start")
        self.head.node_id = self.alive_node_ids()[0]

    def _start(self, name: str, cpus: int, flags: list[str], extra_env: dict[str, str]) -> "RayNode":
        node = RayNode(self.root / name)
        command = [
            "ray", "start", "--block", "--num-cpus", str(cpus), "--disable-usage-stats", *flags,
            "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", str(node.ray_dir),
        ]  # fmt: skip
        env = {**self.env, **extra_env, "TMPDIR": str(node.tmp_dir)}
        # --block ties the node's processes to this one: one process group per node.
        node.process = subprocess.Popen(
            command, env=env, cwd=node.work_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        self.nodes.append(node)
        return node

    def add_node(self, name: str, cpus: int) -> "RayNode":
        """Join a worker node and wait until the cluster counts it."""
        before = set(self.alive_node_ids())
        node = self._start(name, cpus, ["--address", f"127.0.0.1:{self.port}"], {})
        self._wait(lambda: set(self.alive_node_ids()) - before, node, f"node {name} did not join")
        (node.node_id,) = set(self.alive_node_ids()) - before
        return node

    def _wait(self, ready, node: "RayNode", message: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if node.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(message)
            time.sleep(1)

    def alive_node_ids(self) -> list[str]:
        """The live nodes' ids; none while the head is starting (``ray list`` then prints
        "No resource in the cluster" instead of JSON)."""
        listed = self.ray("list", "nodes", "--address", self.address, "--format", "json", "--filter", "state=ALIVE")
        try:
            return [row["node_id"] for row in json.loads(listed.stdout)] if listed.returncode == 0 else []
        except ValueError:
            return []

    def ray(self, *args: str, timeout: float = 120):
        return subprocess.run(["ray", *args], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=REPO)

    def ray_job(self, *args: str, timeout: float = 120):
        return self.ray("job", args[0], "--address", self.address, *args[1:], timeout=timeout)

    def submit(self, job_id: str, *entrypoint: str, timeout: float = 900):
        """`ray job submit --working-dir .`, waiting for the job to end as a user's shell would."""
        return self.ray_job("submit", "--working-dir", ".", "--submission-id", job_id, "--", *entrypoint, timeout=timeout)

    def status(self, job_id: str) -> str:
        """The job's final state as `ray job status` words it: succeeded, failed, ..."""
        result = self.ray_job("status", job_id)
        text = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr)  # colours
        return text.split(f"Job '{job_id}' ", 1)[1].split()[0]

    def logs(self, job_id: str) -> str:
        return self.ray_job("logs", job_id).stdout

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()


class RayNode:
    """One node's folders and its `ray start --block` process (the process group of the node)."""

    def __init__(self, root: Path):
        self.ray_dir, self.tmp_dir, self.work_dir = root / "ray", root / "tmp", root / "work"
        for folder in (self.ray_dir, self.tmp_dir, self.work_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.process = None
        self.node_id = ""  # Ray's id for the node, once it has joined

    def kill(self) -> None:
        """SIGKILL the node's raylet, its workers and everything else it started: a lost machine."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # a test cluster need not wait for a tidy exit
            self.kill()

    def files(self, folder: str) -> list[Path]:
        """Every file under one of the node's folders: ``tmp`` or ``work``."""
        return [path for path in getattr(self, f"{folder}_dir").rglob("*") if path.is_file()]
