"""Batching strategies: packing is exact (same losses and gradients), dense, and trains."""

import json
import types

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from dolly_ray import prompts, testing
from dolly_ray.records import sources, tasks
from dolly_ray.train import batching, data, labels, recipe


def _tokenized(records, tokenizer_dir, max_length):
    """The valid records through the project's validation and tokenization (no Ray needed)."""
    checked = [sources.validate_record(record, sources.parse_columns("alpaca")) for record in records]
    valid = [record for record in checked if not record["skip_reason"]]
    rows = [row for row in data.tokenize_records(valid, prompts.load_tokenizer(str(tokenizer_dir)), max_length) if not row.too_long]
    return [np.asarray(row.input_ids, np.int32) for row in rows], [np.asarray(row.labels, np.int32) for row in rows]


def _column(values):
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def _records_table(ids, record_labels):
    """Records as preparation stores them: ids, a loss mask, token counts."""
    return pa.table(
        {
            "input_ids": pa.array(ids, pa.list_(pa.int32())),
            "loss_mask": pa.array([row != labels.IGNORE_INDEX for row in record_labels], pa.list_(pa.bool_())),
            "num_tokens": pa.array([len(row) for row in ids], pa.int32()),
        }
    )


class InMemoryRows:
    """A worker's rows (``prepared.WorkerRows``) held in memory."""

    def __init__(self, table):
        self.table, self.num_rows = table, table.num_rows

    def read(self, start, stop):
        return batching.numpy_rows(self.table.slice(start, stop - start))


def _loaded(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.resize_token_embeddings(len(prompts.load_tokenizer(model_dir)))
    return model.eval()


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return _loaded(tiny_model_dir)


def _token_losses(model, batch):
    """Per-position next-token losses (0 where the label is ignored) and the summed loss."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", batching.NUM_TOKENS)}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=labels.IGNORE_INDEX, reduction="none")
    return losses, losses.sum()


def test_pack_lengths_places_every_record_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=500)
    rows = batching.pack_lengths(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    assert rows == batching.pack_lengths(lengths, 512)  # deterministic: exact resume needs it
    with pytest.raises(ValueError, match="513 tokens"):
        batching.pack_lengths([10, 513], 512)


def test_packed_rows_mix_records_of_every_length():
    # Three task kinds of distinct lengths: rows sorted by length would hold one kind each.
    records = tasks.generate(600, seed=5, tasks=["first_letter", "sort_numbers", "reverse_word"])
    lengths = np.array([len(prompts.format_training_text(r["instruction"], r["input"], r["output"])) for r in records])
    rows = batching.pack_lengths(lengths, 1024)
    row_means = np.array([lengths[row].mean() for row in rows])
    # Random rows of ~4 records: the spread of row means is about half the records' spread.
    assert row_means.std() < 0.7 * lengths.std(), (row_means.std(), lengths.std())
    assert rows != batching.pack_lengths(lengths, 1024, seed=1)  # the seed decides


@pytest.mark.parametrize("family", testing.FAMILIES)
def test_packed_forward_gives_the_same_losses_and_gradients(family, family_model_dir):
    """For every family: restarting position ids isolate packed records (transformers
    builds the block-diagonal mask from them), so packing changes no record's loss."""
    model_dir = family_model_dir(family)
    tiny_model = _loaded(model_dir)
    ids, record_labels = _tokenized(tasks.generate(24, seed=3), model_dir, max_length=256)
    lengths = np.array([len(x) for x in ids])
    if family == "mistral":  # its sliding window slides within the longer records
        assert lengths.max() > tiny_model.config.sliding_window
    padded = batching.PaddedRecordsCollator(0)({"input_ids": _column(ids), "labels": _column(record_labels)})
    packed_rows = batching.pack(_records_table(ids, record_labels), max_length=256)
    assert packed_rows.num_rows < len(ids) / 3  # several records share each row
    packed = batching.PackedRowsCollator(0)(batching.numpy_rows(packed_rows))
    assert int(packed[batching.NUM_TOKENS]) == int(padded[batching.NUM_TOKENS]) == lengths.sum()
    assert labels.label_tokens(packed["labels"]) == labels.label_tokens(padded["labels"])

    # Per-record mean loss, unpacked (one padded row each) and packed (a segment of a row).
    padded_losses, padded_sum = _token_losses(tiny_model, padded)
    packed_losses, packed_sum = _token_losses(tiny_model, packed)
    n_labels = (padded["labels"][:, 1:] != labels.IGNORE_INDEX).sum(1)
    unpacked_means = padded_losses.sum(1) / n_labels
    packed_means = torch.empty(len(ids))
    for row, records in enumerate(batching.pack_lengths(lengths, 256)):
        start = 0
        for i in records:
            # Logit at position t predicts token t+1: record i's predictions sit at [start, start+len-1).
            packed_means[i] = packed_losses[row, start : start + lengths[i] - 1].sum() / n_labels[i]
            start += lengths[i]
    torch.testing.assert_close(packed_means, unpacked_means, rtol=0, atol=1e-5)

    # One step's gradients of the per-token loss agree too.
    def grads(loss):
        tiny_model.zero_grad()
        loss.backward()
        return {name: p.grad.clone() for name, p in tiny_model.named_parameters() if p.grad is not None}

    tokens = float(n_labels.sum())
    unpacked_grads, packed_grads = grads(padded_sum / tokens), grads(packed_sum / tokens)
    assert unpacked_grads.keys() == packed_grads.keys() and unpacked_grads
    for name, grad in unpacked_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # The check has teeth: packing without restarting positions lets records see each other.
    leaky = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])}
    with torch.no_grad():
        leaky_losses, _ = _token_losses(tiny_model, leaky)
    assert (leaky_losses - packed_losses.detach()).abs().max() > 1e-3


def test_packing_fills_rows_on_real_instruction_data(shared_records_path, tmp_path):
    with open(shared_records_path) as f:
        records = json.load(f)
    testing.build_tokenizer(tmp_path, vocab_size=4096, corpus=testing.english_corpus(records))
    ids, _ = _tokenized(records, tmp_path, max_length=1024)
    lengths = [len(x) for x in ids]
    rows = batching.pack_lengths(lengths, 1024)
    fraction = sum(lengths) / (len(rows) * 1024)
    assert fraction >= 0.97, fraction
    # Padding each micro-batch of 8 records to its longest (pad) wastes far more.
    pad_fraction = sum(lengths) / sum(8 * max(lengths[i : i + 8]) for i in range(0, len(lengths), 8))
    assert pad_fraction < 0.8 * fraction, pad_fraction


def _numbered_records(n, seed=1):
    """Records whose first token is their number, of random lengths."""
    lengths = np.random.default_rng(seed).integers(2, 200, n)
    ids = [np.concatenate([[i], np.arange(1, length)]).astype(np.int32) for i, length in enumerate(lengths)]
    return InMemoryRows(_records_table(ids, ids))


def test_group_keeps_the_micro_batch_count_and_groups_lengths():
    rows = _numbered_records(700)
    counts, padded_tokens = {}, {}
    for strategy in ("pad", "group"):
        batches = list(batching.micro_batches(rows, strategy, micro_batch_size=4, pad_token_id=0, window_rows=64, seed=7))
        counts[strategy] = len(batches)
        padded_tokens[strategy] = sum(b["input_ids"].numel() for b in batches)
        assert sum(int(b[batching.NUM_TOKENS]) for b in batches) == pc.sum(rows.table["num_tokens"]).as_py()
    assert counts["pad"] == counts["group"] == 175  # what plan_steps counts: ceil(700 / 4)
    assert padded_tokens["group"] < 0.75 * padded_tokens["pad"]


@pytest.mark.parametrize("strategy", batching.STRATEGIES)
def test_an_epoch_gives_every_row_once_and_a_resumed_pass_the_same_micro_batches(strategy):
    table = _numbered_records(301).table
    if strategy == "pack":
        table = batching.pack(table, 1024)
    rows = InMemoryRows(table)

    def first_tokens(seed, skip=0):
        batches = batching.micro_batches(rows, strategy, micro_batch_size=4, pad_token_id=0, window_rows=30, seed=seed, skip=skip)
        return [[int(row[0]) for row in batch["input_ids"]] for batch in batches]

    epoch = first_tokens(seed=5)
    assert len(epoch) == -(-rows.num_rows // 4)
    if strategy != "pack":  # a packed row starts with one of its records
        assert sorted(i for batch in epoch for i in batch) == list(range(301))
    assert first_tokens(seed=5, skip=17) == epoch[17:]  # resumed mid-window, mid-epoch
    assert first_tokens(seed=6) != epoch  # the next epoch is shuffled anew
    assert first_tokens(seed=None) == first_tokens(seed=None, skip=0)


def test_unknown_batching_is_refused():
    with pytest.raises(ValueError, match="unknown batching 'packed'"):
        recipe.TrainConfig(preset="cpu", batching="packed")


def test_packing_refuses_attention_that_ignores_positions(tiny_model):
    batching.check_packing_attention(tiny_model.config)  # GPT-J's default, eager
    with pytest.raises(ValueError, match="flash_attention_2"):
        batching.check_packing_attention(types.SimpleNamespace(_attn_implementation="flash_attention_2"))
