"""Generation throughput: Dolly's one-prompt-at-a-time loop vs InstructionGenerator vs the Ray Data job.

Same model, same prompts, greedy decoding. (a) is Dolly's README ``generate_response``:
tokenize one prompt, ``model.generate``, decode. (b) is ``InstructionGenerator.generate``
over all prompts at once (left padding, length-sorted micro-batches). (d) is Serve's
engine, ``ContinuousBatcher``, with every prompt submitted at once. (c) is
``dolly_ray.batch.generation.run`` with two actors, timed from the first block to the last row
written, so it includes starting the actors and loading the model in each. (e), where
vLLM is installed (run it with ``.venv-vllm/bin/python``), is the same job with the vllm
engine (vLLM's CPU build through ``ray.data.llm``, one engine), engine start included.

The default model is the tests' tiny random GPT-J with a tokenizer trained on ``--data``
(``--vocab-size`` 4096): about 3.7 characters per token, near GPT-J's own, so prompts
have realistic token counts (median 44). The tests' letter-level tokenizer would make
them twice as long, and prefill and attention would dominate.

(a) and (b) should give identical texts; the count of mismatches is printed, not hidden.
The last line is JSON. On a shared or busy machine timings vary a lot: ``--repeats``
keeps the fastest of several runs of (a) and (b), and ``--threads 1`` avoids the
stalls that torch's thread pool suffers when other processes hold the cores (which
slow (a)'s many tiny steps far more than (b), flattering the ratio).

    python benchmarks/generation_throughput.py [--model DIR] [--num-prompts 256]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import tempfile
import time

import torch

from dolly_ray import prompts, testing
from dolly_ray.batch import generation, output
from dolly_ray.batch.config import BatchConfig
from dolly_ray.generate.continuous_batching import ContinuousBatcher, Unsupported
from dolly_ray.generate.generator import GenerationParams, InstructionGenerator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "alpaca_eval_davinci003.json")


def generate_response_naive(instruction: str, *, model, tokenizer, max_new_tokens: int) -> tuple[str, int]:
    """Dolly README's generate_response, greedy: one prompt, one generate call, decode.

    Decodes with skip_special_tokens like InstructionGenerator, so texts are comparable.
    """
    input_ids = tokenizer(prompts.format_prompt(instruction), return_tensors="pt").input_ids.to(model.device)
    response_key_token_id = tokenizer.encode(prompts.RESPONSE_KEY)[0]
    end_key_token_id = tokenizer.encode(prompts.END_KEY)[0]
    gen_tokens = model.generate(
        input_ids,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=end_key_token_id,
        do_sample=False,
        max_new_tokens=max_new_tokens,
    )[0].cpu()
    num_new = len(gen_tokens) - input_ids.shape[1]
    response_pos = (gen_tokens == response_key_token_id).nonzero()[0].item()
    end_positions = (gen_tokens == end_key_token_id).nonzero()
    end_pos = end_positions[0].item() if len(end_positions) else None
    return tokenizer.decode(gen_tokens[response_pos + 1 : end_pos], skip_special_tokens=True).strip(), num_new


def batch_job(tmp: str, model_dir: str, source: str, args: argparse.Namespace, *, engine: str, num_actors: int) -> tuple[dict, list[str]]:
    """The batch-generation job over ``source``: its summary and the responses in order."""
    summary = generation.run(
        BatchConfig(
            model=model_dir,
            input=source,
            output=os.path.join(tmp, f"responses-{engine}"),
            engine=engine,
            num_actors=num_actors,
            num_cpus_per_actor=1 / num_actors,  # the actors on one CPU, leaving the other for the read task
            batch_size=args.batch_size,
            rows_per_call=-(-args.num_prompts // num_actors),  # one call per actor
            max_batch_tokens=args.max_batch_tokens or None,
            max_new_tokens=args.max_new_tokens,
            greedy=True,
        )
    )
    return summary, [row["response"] for row in output.read_rows(summary["output"])]


def best_of(repeats: int, fn):
    """(fastest seconds, result of that run)."""
    best = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        if best is None or seconds < best[0]:
            best = (seconds, result)
    return best


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default=None, help="model directory; default: a tiny random GPT-J built in a temp dir")
    p.add_argument("--data", default=DEFAULT_DATA, help="JSON array of records with an instruction field")
    p.add_argument(
        "--vocab-size", type=int, default=4096,
        help="tokenizer of the default model, trained on --data: GPT-J-like tokens per word",
    )
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128, help="most micro-batch rows for (b) and (c)")
    p.add_argument("--max-batch-tokens", type=int, default=8192, help="micro-batch cap on rows x padded length; 0: none")
    p.add_argument("--repeats", type=int, default=2, help="runs of (a) and (b); the fastest counts")
    p.add_argument("--threads", type=int, default=0, help="torch threads for (a) and (b); 0: torch's default")
    p.add_argument("--skip-ray", action="store_true", help="leave out (c) and (e)")
    p.add_argument("--smoke", action="store_true", help="the smallest sizes, so CI checks the script still runs (its figures mean nothing)")
    args = p.parse_args()
    if args.smoke:
        vars(args).update(num_prompts=8, max_new_tokens=4, batch_size=4, max_batch_tokens=0, repeats=1, vocab_size=600)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    with tempfile.TemporaryDirectory() as tmp:
        with open(args.data) as f:
            records = json.load(f)
        instructions = [r["instruction"] for r in records[: args.num_prompts]]
        model_dir = args.model or str(
            testing.build_model(
                os.path.join(tmp, "tiny-gptj"),
                tokenizer_corpus=testing.english_corpus(records),
                tokenizer_vocab_size=args.vocab_size,
            )
        )
        generator = InstructionGenerator.from_pretrained(model_dir)
        model, tokenizer = generator.model, generator.tokenizer
        params = GenerationParams(greedy=True, max_new_tokens=args.max_new_tokens)
        max_batch_tokens = args.max_batch_tokens or None
        generator.generate(instructions[:2], params)  # warm-up

        def naive():  # model.generate runs under no_grad itself, as in Dolly's README
            return [
                generate_response_naive(i, model=model, tokenizer=tokenizer, max_new_tokens=args.max_new_tokens)
                for i in instructions
            ]

        seconds_a, out_a = best_of(args.repeats, naive)
        tokens_a = sum(n for _, n in out_a)
        seconds_b, out_b = best_of(
            args.repeats,
            lambda: generator.generate(instructions, params, batch_size=args.batch_size, max_batch_tokens=max_batch_tokens),
        )
        tokens_b = sum(r.num_generated_tokens for r in out_b)
        mismatches = [i for i, ((text, _), r) in enumerate(zip(out_a, out_b)) if text != r.response]
        result = {
            "model": args.model or f"tiny random GPT-J (dolly_ray.testing.build_model), {args.vocab_size}-token BPE trained on --data",
            "prompts": len(instructions),
            "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size,
            "max_batch_tokens": max_batch_tokens,
            "device": str(generator.device),
            "torch_threads": torch.get_num_threads(),
            "naive_tokens_per_s": round(tokens_a / seconds_a, 1),
            "batched_tokens_per_s": round(tokens_b / seconds_b, 1),
            "ratio_b_over_a": round((tokens_b / seconds_b) / (tokens_a / seconds_a), 2),
            "generated_tokens_a": tokens_a,
            "generated_tokens_b": tokens_b,
            "text_mismatches_a_vs_b": len(mismatches),
        }
        print(f"(a) naive:   {tokens_a} tokens in {seconds_a:.2f}s", flush=True)
        print(f"(b) batched: {tokens_b} tokens in {seconds_b:.2f}s; {len(mismatches)} text mismatches vs (a)", flush=True)
        if mismatches:
            i = mismatches[0]
            print(f"first mismatch, prompt {i}: naive={out_a[i][0]!r} batched={out_b[i].response!r}", flush=True)

        try:
            engine = ContinuousBatcher(generator, max_requests_per_batch=args.batch_size)
        except Unsupported as e:  # e.g. with the transformers that vLLM's CPU build pins
            print(f"(d) continuous batching: not run: {e}", flush=True)
        else:

            async def all_at_once():
                return await asyncio.gather(*(engine.answer(i, params) for i in instructions))

            seconds_d, out_d = best_of(args.repeats, lambda: asyncio.run(all_at_once()))
            engine.stop()
            tokens_d = sum(r.num_generated_tokens for r in out_d)
            result.update(
                continuous_tokens_per_s=round(tokens_d / seconds_d, 1),
                ratio_d_over_a=round((tokens_d / seconds_d) / (tokens_a / seconds_a), 2),
                text_mismatches_d_vs_b=sum(d.response != b.response for d, b in zip(out_d, out_b)),
            )
            print(f"(d) continuous batching: {tokens_d} tokens in {seconds_d:.2f}s; {result['text_mismatches_d_vs_b']} text mismatches vs (b)", flush=True)

        if not args.skip_ray:
            import ray

            ray.init(include_dashboard=False, log_to_driver=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
            source = os.path.join(tmp, "prompts.jsonl")
            with open(source, "w") as f:
                f.writelines(json.dumps({"instruction": i}) + "\n" for i in instructions)
            summary, out_c = batch_job(tmp, model_dir, source, args, engine="hf", num_actors=2)
            print(
                f"(c) ray data, 2 actors: {summary['generated_tokens']} tokens in {summary['seconds']:.2f}s "
                "(actor start and model load included)",
                flush=True,
            )
            result.update(
                ray_data_tokens_per_s=summary["tokens_per_s"],
                ray_data_seconds=summary["seconds"],
                text_mismatches_c_vs_b=sum(c != b.response for c, b in zip(out_c, out_b)),
            )
            if importlib.util.find_spec("vllm") is not None:
                summary, out_e = batch_job(tmp, model_dir, source, args, engine="vllm", num_actors=1)
                print(f"(e) vllm engine, ray data: {summary['generated_tokens']} tokens in {summary['seconds']:.2f}s (engine start included)", flush=True)
                result.update(
                    vllm_tokens_per_s=summary["tokens_per_s"],
                    vllm_seconds=summary["seconds"],
                    text_mismatches_e_vs_b=sum(e != b.response for e, b in zip(out_e, out_b)),
                )
            ray.shutdown()
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
