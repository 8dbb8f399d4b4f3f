"""How well generated answers match their references: exact match, ROUGE-L and the share
that stopped at ``### End``.

The one definition of these figures, for training's ``--eval-generate``, the evaluation
job and the demo. ROUGE-L is Google's ``rouge-score`` with its default tokenization
(lowercased ASCII words, as published ROUGE figures use: text in other scripts scores 0).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

FIGURES = ("exact_match", "rouge_l", "stopped_at_end")


@dataclass
class Scored:
    """One answer's figures: each is 0 or 1 but ``rouge_l`` (an F-measure in [0, 1])."""

    exact_match: float
    rouge_l: float
    stopped_at_end: float


@functools.cache
def _rouge():
    from absl import logging as absl_logging
    from rouge_score import rouge_scorer

    absl_logging.set_verbosity(absl_logging.WARNING)  # rouge_score's "Using default tokenizer." on every scorer
    return rouge_scorer.RougeScorer(["rougeL"])


def matches(response: str, reference: str) -> bool:
    """Exact match: equal after trimming whitespace at both ends."""
    return response.strip() == reference.strip()


def score(response: str, reference: str, finish_reason: str) -> Scored:
    """``finish_reason`` is the generator's: "stop" when the answer ended at ``### End``."""
    return Scored(
        exact_match=float(matches(response, reference)),
        rouge_l=_rouge().score(reference, response)["rougeL"].fmeasure,
        stopped_at_end=float(finish_reason == "stop"),
    )


def means(scored: Sequence[Scored]) -> dict[str, float]:
    """Each figure's mean over the answers (0 for none)."""
    return {name: sum(getattr(s, name) for s in scored) / len(scored) if scored else 0.0 for name in FIGURES}


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions that match their reference (``matches``)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    return sum(map(matches, predictions, references)) / len(references)
