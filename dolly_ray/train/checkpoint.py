"""What a training checkpoint holds, and how it is written and read back.

Layout of one Ray Train checkpoint directory::

    deepspeed/   sharded ZeRO-3 state from every rank: exact resume (model, optimizer,
                 LR schedule, step counter, data position in ``client_state``); with
                 LoRA only the trainable parameters' (the frozen base is the model's own)
    adapter/     with LoRA: the peft adapter and tokenizer (``lora.load_with_adapter``)
    hf/          consolidated Hugging Face model (safetensors; with LoRA, merged) + tokenizer with the
                 prompt keys and the Dolly prompt as its chat template + a generation
                 config that stops at ``### End`` + loss curve: what serving and batch
                 generation load, with plain ``transformers`` and no dolly_ray import
    history.jsonl  every metric reported so far (rank 0), so a resumed run keeps its curve
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dolly_ray import prompts, storage
from dolly_ray.generate import generator, scoring
from dolly_ray.train import lora

DEEPSPEED_DIR = "deepspeed"
HF_DIR = "hf"
ADAPTER_DIR = "adapter"
HISTORY_FILE = "history.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"


def save(engine, tokenizer, directory: str | Path, *, client_state: dict, with_hf_model: bool) -> None:
    """Write this rank's part of a checkpoint into ``directory``; every rank must call it.
    Rank 0 then adds the history (``write_history``).

    Both the DeepSpeed save and the 16-bit consolidation are collective operations.
    """
    directory = Path(directory)
    # Frozen weights (all but the adapters with LoRA) come back from the model itself.
    engine.save_checkpoint(str(directory / DEEPSPEED_DIR), tag="state", client_state=client_state, exclude_frozen_parameters=True)
    if not with_hf_model:
        return
    model = engine.module
    state_dict = engine._zero3_consolidated_16bit_state_dict()  # also what HF Trainer uses
    adapter = lora.adapter_state_dict(model) if lora.is_peft(model) else None  # gathered by every rank
    if engine.global_rank != 0:
        return
    tokenizer.chat_template = prompts.CHAT_TEMPLATE
    if adapter is not None:
        model.save_pretrained(str(directory / ADAPTER_DIR), state_dict=adapter, save_embedding_layers=False)
        tokenizer.save_pretrained(str(directory / ADAPTER_DIR))
        state_dict, model = lora.merged_state_dict(state_dict, model), model.get_base_model()
    model.generation_config.update(**generator.exported_generation_settings(tokenizer))
    model.save_pretrained(str(directory / HF_DIR), state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(str(directory / HF_DIR))


def write_history(directory: str | Path, history: list[dict]) -> None:
    """The metric history, and the loss curve beside a Hugging Face model if there is one."""
    directory = Path(directory)
    with open(directory / HISTORY_FILE, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in history)
    if (directory / HF_DIR).is_dir():
        plot_loss_curve(history, directory / HF_DIR / LOSS_CURVE_FILE)


def load(engine, directory: str | Path) -> tuple[dict, list[dict]]:
    """Restore the DeepSpeed state in place; return the client state and metric history."""
    directory = Path(directory)
    # A LoRA checkpoint holds the trainable parameters only (see ``save``).
    path, client_state = engine.load_checkpoint(str(directory / DEEPSPEED_DIR), tag="state", load_module_strict=not lora.is_peft(engine.module))
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed state in {directory / DEEPSPEED_DIR}")
    return client_state, read_history(directory) if (directory / HISTORY_FILE).exists() else []


def read_history(directory: str | Path) -> list[dict]:
    """The metric rows a checkpoint (a directory or a URI) holds, one per reported step."""
    text = storage.read_text(storage.join(str(directory), HISTORY_FILE))
    return [json.loads(line) for line in text.splitlines() if line]


def plot_loss_curve(history: list[dict], path: str | Path) -> None:
    """Train and eval loss against optimizer step, as a PNG; with ``--eval-generate``, a
    second panel holds the answers' exact match, ROUGE-L and share stopped at ``### End``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    answer_figures = [(f"eval_{name}", name.replace("_", " ")) for name in scoring.FIGURES]
    scored = any(row.get(key) is not None for row in history for key, _ in answer_figures)
    fig, axes = plt.subplots(1, 2 if scored else 1, figsize=(13 if scored else 7, 4), squeeze=False)
    loss, answers = axes[0][0], axes[0][-1]
    _plot(loss, history, (("train_loss", "train"), ("eval_loss", "eval")))
    loss.set_ylabel("loss")
    loss.set_yscale("log")
    if scored:
        _plot(answers, history, answer_figures, marker="o")
        answers.set_ylabel("held-out answers")
        answers.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot(ax, history: list[dict], series, marker=None) -> None:
    for key, label in series:
        points = [(row["step"], row[key]) for row in history if row.get(key) is not None]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker=marker or ("o" if key == "eval_loss" else None), label=label)
    ax.set_xlabel("optimizer step")
    ax.grid(True, alpha=0.3)
    ax.legend()
