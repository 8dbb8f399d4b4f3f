"""What one batch-generation job is (its flags) and what each output row gains."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pyarrow as pa

from dolly_ray.cli import option

# The error of a row whose generation raised (either engine); the job goes on with the others.
GENERATION_FAILED = "generation_failed"
# What each output row gains; an input column with one of these names is kept as original_<name>.
RESULT_SCHEMA = pa.schema(
    [
        ("response", pa.string()),
        ("finish_reason", pa.string()),
        ("num_prompt_tokens", pa.int64()),
        ("num_generated_tokens", pa.int64()),
        ("truncated", pa.bool_()),
        ("error", pa.string()),
    ]
)


@dataclass
class BatchConfig:
    """One batch-generation job; the CLI flags fill it one to one."""

    model: str = option(dataclasses.MISSING, "checkpoint directory (local or s3://...) or Hugging Face model id")
    input: str = option(dataclasses.MISSING, "JSON/JSONL/Parquet file or directory, a datasets dir, or a hub dataset id")
    output: str = option(dataclasses.MISSING, "output directory, local or remote, of part files in input order; a rerun resumes it (keep it until the job is done); a .parquet name picks Parquet")
    columns: str = option("alpaca", "schema name (alpaca, dolly) or instruction=A,input=B (an output= part is ignored)")
    split: str = option("train", "split of a Hugging Face dataset")
    output_format: str | None = option(None, "jsonl or parquet, overriding the output's suffix (none: jsonl)")
    restart: bool = option(False, "delete what an earlier run of this job wrote to --output and answer every row afresh (without it a rerun resumes, and refuses other settings)")
    rows_per_part: int = option(10_000, "rows per output part file; a job that dies answers again at most the part it was writing (a part also ends after 10 minutes)")
    engine: str = option("auto", "hf (transformers), vllm (vLLM through ray.data.llm) or auto: vllm where vLLM is installed and actors get GPUs")
    num_actors: int = option(1, "generation actors (vllm: engines), each holding one model")
    num_gpus_per_actor: float | None = option(None, "GPUs per actor (default: 1 when the cluster has GPUs, else 0)")
    num_cpus_per_actor: float | None = option(None, "CPUs per actor, fractions allowed (default: 1; on a local Ray started by this job, a share of the CPUs that reading the input leaves)")
    batch_size: int = option(16, "prompts per model.generate call")
    max_batch_tokens: int | None = option(None, "also cap rows x padded length per generate call (long prompts: fewer rows)")
    rows_per_call: int | None = option(None, "rows per actor call, length-sorted within it (default: 4 x batch size)")
    max_new_tokens: int = option(256, "longest response, in tokens")
    greedy: bool = option(False, "greedy decoding instead of sampling")
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(0.92, "nucleus sampling threshold")
    top_k: int = option(0, "top-k sampling (0: off)")
    seed: int | None = option(None, "seed for sampling")
    trust_remote_code: bool = option(False, "run model code from the hub (only for models you trust)")
    allow_pickle: bool = option(False, "allow non-safetensors weights (loading a pickle can run code)")

    def params(self):
        from dolly_ray.generate.generator import GenerationParams

        return GenerationParams(
            max_new_tokens=self.max_new_tokens,
            greedy=self.greedy,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
        )
