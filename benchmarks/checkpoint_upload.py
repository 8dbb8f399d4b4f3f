"""Checkpoints to object storage: what training waits for with Ray Train's synchronous
upload and with its asynchronous one.

Starts an S3-compatible server on 127.0.0.1 (moto, as the tests do), then trains the same
run three times on an embedded local Ray with ``--storage-path s3://...``: without
checkpoints before the last (the baseline), then with a checkpoint every
``--checkpoint-every`` steps, once with ``--checkpoint-upload sync`` (the step after a
checkpoint waits for its upload) and once with ``async`` (the upload runs beside training).
Reports, per mode, the mean seconds per optimizer step over the run (from the metrics'
report times, so checkpoint saves and waits are inside it), the mean checkpoint save and
upload seconds, and the checkpoint size; then what checkpointing adds to a step in each mode.

    python benchmarks/checkpoint_upload.py                # a few minutes on 2 cores
    python benchmarks/checkpoint_upload.py --n-embd 768   # bigger checkpoints

The last line printed is JSON with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

from dolly_ray import cluster, testing
from dolly_ray.records import tasks
from dolly_ray.train import checkpoint, recipe


def one_run(mode: str, model: str, dataset: str, args) -> dict:
    """``mode``: none (a checkpoint only at the end), sync or async."""
    config = testing.cpu_train_config(
        model, dataset, "s3://runs/bench", mode,
        max_steps=args.steps, micro_batch_size=4, log_every=1, checkpoint_every=0 if mode == "none" else args.checkpoint_every,
        checkpoint_upload="sync" if mode == "none" else mode, num_to_keep=2, hf_model_every_checkpoint=True,
    )  # fmt: skip
    summary = recipe.run(config)
    history = checkpoint.read_history(summary["checkpoint"])
    times = [row["time"] for row in history]
    saved = [row for row in history if "checkpoint_save_s" in row]
    uploads = [row["checkpoint_upload_s"] for row in saved if "checkpoint_upload_s" in row] + [summary["checkpoint_upload_s"]]
    return {
        "mode": mode,
        "steps": len(history),
        "checkpoints": len(saved),
        "step_s": (times[-1] - times[0]) / (len(times) - 1),
        "checkpoint_save_s": statistics.mean(row["checkpoint_save_s"] for row in saved),  # the last one's too
        "checkpoint_upload_s": statistics.mean(uploads),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per run (default: 16)")
    parser.add_argument("--checkpoint-every", type=int, default=2, help="checkpoint every N steps (default: 2)")
    parser.add_argument("--n-embd", type=int, default=512, help="width of the tiny GPT-J (default: 512)")
    parser.add_argument("--n-layer", type=int, default=4, help="layers of the tiny GPT-J (default: 4)")
    parser.add_argument("--smoke", action="store_true", help="the smallest sizes, so CI checks the script still runs (its figures mean nothing)")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(steps=2, checkpoint_every=1, n_embd=64, n_layer=1)

    s3 = testing.S3Server()
    os.environ.update(s3.env)  # before Ray starts: its workers inherit this environment
    try:
        s3.create_bucket("runs")
        work = tempfile.mkdtemp(prefix="checkpoint_upload_")
        model = str(testing.build_model(os.path.join(work, "model"), n_embd=args.n_embd, n_layer=args.n_layer, head_dim=64))
        dataset = str(tasks.write_jsonl(tasks.generate(400, seed=0), os.path.join(work, "tasks.jsonl")))
        cluster.init_ray()
        runs = {mode: one_run(mode, model, dataset, args) for mode in ("none", "sync", "async")}
        size = sum(s3.client().head_object(Bucket="runs", Key=key)["ContentLength"] for key in s3.keys("runs", "bench/sync/") if "/checkpoint_2" in key)
    finally:
        s3.stop()
    for run in runs.values():
        print(
            f"{run['mode']:>5}: {run['step_s']:.3f} s per step over {run['steps']} steps with {run['checkpoints']} checkpoints; "
            f"checkpoint save {run['checkpoint_save_s']:.2f} s, upload {run['checkpoint_upload_s']:.2f} s"
        )
    added = {mode: runs[mode]["step_s"] - runs["none"]["step_s"] for mode in ("sync", "async")}
    print(f"one checkpoint in the bucket: {size / 2 / 2**20:.0f} MiB; checkpointing adds per step: sync {added['sync']:.3f} s, async {added['async']:.3f} s")
    print(json.dumps({"runs": list(runs.values()), "checkpoint_mib": size / 2 / 2**20, "added_step_s": added, **vars(args)}))

if __name__ == "__main__":
    main()
