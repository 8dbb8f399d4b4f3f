"""Hostile instruction records: garbage a real dataset may hold, with what should become of it.

Use it to check that a pipeline survives bad data before a long run does: write a
file that mixes your own good records with every kind of hostile line, run the data
pipeline (or the batch job) over it, and compare the skip counts with the
expectations carried by each case. Deterministic for a given seed; no Ray import.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterable, NamedTuple


class Case(NamedTuple):
    """One hostile JSONL line and what the pipeline should make of it.

    ``skip_reason`` is the reason training's data pipeline counts it under ("" when the
    record is odd but usable); ``batch_error`` is the prefix of the ``error`` the batch
    job gives its row (None when the job answers it: generation needs no output field).
    """

    kind: str
    line: bytes
    skip_reason: str
    batch_error: str | None


def _json(record) -> bytes:
    return json.dumps(record).encode()


def cases(long_chars: int = 1_000_000) -> list[Case]:
    """Every kind of hostile line, once, for the alpaca column names.

    ``long_chars`` is the size of the oversized strings (1 MB by default): too long to
    train on at any sensible ``max_length``, and cut from the left when prompted.
    """
    ok = {"instruction": "Say hi.", "input": "", "output": "hi"}
    long_text = ("abcdefgh " * (long_chars // 9 + 1))[:long_chars]
    return [
        # Fields missing, null, or of the wrong type.
        Case("missing_instruction", _json({"input": "x", "output": "y"}), "missing_instruction", "missing_instruction"),
        Case("missing_output", _json({"instruction": "Say hi."}), "missing_output", None),
        Case("missing_all", _json({"unrelated": 1}), "missing_instruction", "missing_instruction"),
        Case("null_instruction", _json({**ok, "instruction": None}), "null_instruction", "null_instruction"),
        Case("null_output", _json({**ok, "output": None}), "null_output", None),
        Case("null_input", _json({**ok, "input": None}), "", None),
        Case("number_instruction", _json({**ok, "instruction": 42}), "non_string_instruction", "non_string_instruction"),
        Case("bool_instruction", _json({**ok, "instruction": True}), "non_string_instruction", "non_string_instruction"),
        Case("list_output", _json({**ok, "output": ["h", "i"]}), "non_string_output", None),
        Case("object_input", _json({**ok, "input": {"text": "x"}}), "non_string_input", "non_string_input"),
        Case("nan_instruction", b'{"instruction": NaN, "output": "y"}', "non_string_instruction", "non_string_instruction"),
        # Empty and whitespace-only text.
        Case("empty_instruction", _json({**ok, "instruction": ""}), "empty_instruction", "empty_instruction"),
        Case("whitespace_instruction", _json({**ok, "instruction": " \t\u3000 "}), "empty_instruction", "empty_instruction"),
        Case("whitespace_output", _json({**ok, "output": "\n \t\n"}), "empty_output", None),
        # Oversized text.
        Case("long_instruction", _json({**ok, "instruction": long_text}), "too_long", None),
        Case("long_output", _json({**ok, "output": long_text}), "too_long", None),
        # Text that is odd but still text: trained on and answered as it is.
        Case("control_characters", _json({**ok, "instruction": "Say\x00 hi\x07\x1b[31m.\x7f"}), "", None),
        Case("unicode_line_separators", '{"instruction": "Say\u2028hi\u2029.", "output": "hi"}'.encode(), "", None),
        Case("byte_order_mark", b"\xef\xbb\xbf" + _json(ok), "", None),
        # Not a record at all.
        Case("prompt_key_in_instruction", _json({**ok, "instruction": "### Response: hi"}), "prompt_key_in_instruction", "prompt_key_in_instruction"),
        Case("array", _json(["Say hi.", "hi"]), "not_an_object", "not_an_object"),
        Case("bare_string", _json("Say hi."), "not_an_object", "not_an_object"),
        Case("json_null", b"null", "not_an_object", "not_an_object"),
        # Lines that do not decode.
        Case("truncated_json", b'{"instruction": "Say hi.", "output": ', "malformed_json", "malformed_json"),
        Case("trailing_garbage", _json(ok) + b" }{", "malformed_json", "malformed_json"),
        Case("raw_control_character", b'{"instruction": "Say\x01hi", "output": "hi"}', "malformed_json", "malformed_json"),
        Case("raw_carriage_return", b'{"instruction": "Say\rhi", "output": "hi"}', "malformed_json", "malformed_json"),
        Case("deep_nesting", b'{"instruction": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "malformed_json", "malformed_json"),
        Case("huge_integer", b'{"instruction": ' + b"9" * 5000 + b', "output": "y"}', "malformed_json", "malformed_json"),
        Case("invalid_utf8", b'{"instruction": "Say \xff\xfe hi", "output": "hi"}', "invalid_utf8", "invalid_utf8"),
        Case("lone_surrogate", b'{"instruction": "Say \\ud800 hi", "output": "hi"}', "invalid_unicode", "invalid_unicode"),
        Case("lone_surrogate_in_other_field", b'{"instruction": "Say hi.", "output": "hi", "id": "\\udfff"}', "", None),
    ]


def write_mixed_jsonl(path: str | Path, good_records: Iterable[dict], seed: int = 0, long_chars: int = 1_000_000) -> list[Case]:
    """Write the good records and as many hostile lines, shuffled, to a JSONL file.

    The hostile lines cycle through every kind of ``cases()``. Returns one Case per
    line, in file order; good records appear as ``Case("good", ..., "", None)``.
    """
    good = [Case("good", _json(record), "", None) for record in good_records]
    kinds = cases(long_chars)
    lines = good + [kinds[i % len(kinds)] for i in range(len(good))]
    random.Random(seed).shuffle(lines)
    Path(path).write_bytes(b"".join(case.line + b"\n" for case in lines))
    return lines
