"""The prompt format is Dolly's, byte for byte, and the prompt keys are single tokens."""

import pytest
from transformers import AutoTokenizer

from dolly_ray import prompts, testing

DOLLY_TRAINING_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n"
    "\n"
    "### Instruction:\n"
    "Name a primary color.\n"
    "\n"
    "### Response:\n"
    "Red.\n"
    "\n"
    "### End"
)
DOLLY_TRAINING_WITH_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n"
    "\n"
    "### Instruction:\n"
    "Summarise the text.\n"
    "\n"
    "Input:\n"
    "Ray is a framework for scaling Python.\n"
    "\n"
    "### Response:\n"
    "Ray scales Python.\n"
    "\n"
    "### End"
)
DOLLY_GENERATION_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n"
    "\n"
    "### Instruction:\n"
    "Name a primary color.\n"
    "\n"
    "### Response:\n"
)
DOLLY_GENERATION_WITH_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n"
    "\n"
    "### Instruction:\n"
    "Summarise the text.\n"
    "\n"
    "Input:\n"
    "Ray is a framework for scaling Python.\n"
    "\n"
    "### Response:\n"
)


def test_training_text_matches_dolly():
    assert prompts.format_training_text("Name a primary color.", "Red.") == DOLLY_TRAINING_NO_INPUT
    assert prompts.format_training_text("Name a primary color.", "Red.", input="") == DOLLY_TRAINING_NO_INPUT
    assert (
        prompts.format_training_text("Summarise the text.", "Ray scales Python.", input="Ray is a framework for scaling Python.")
        == DOLLY_TRAINING_WITH_INPUT
    )


def test_generation_prompt_matches_dolly():
    assert prompts.format_prompt("Name a primary color.") == DOLLY_GENERATION_NO_INPUT
    assert prompts.format_prompt("Name a primary color.", "   ") == DOLLY_GENERATION_NO_INPUT
    assert prompts.format_prompt("Summarise the text.", "Ray is a framework for scaling Python.") == DOLLY_GENERATION_WITH_INPUT


def test_special_tokens_are_single_ids_that_round_trip(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.pad_token is None
    base_size = len(tokenizer)
    ids = prompts.add_special_tokens(tokenizer)
    assert len(tokenizer) == base_size + 3
    assert tokenizer.pad_token == tokenizer.eos_token and ids.pad == tokenizer.eos_token_id
    for key, token_id in [(prompts.END_KEY, ids.end), (prompts.INSTRUCTION_KEY, ids.instruction), (prompts.RESPONSE_KEY, ids.response)]:
        assert tokenizer.encode(key, add_special_tokens=False) == [token_id]
        assert tokenizer.decode([token_id]) == key
    # Keys inside a full prompt are still matched as single tokens.
    encoded = tokenizer.encode(DOLLY_TRAINING_WITH_INPUT, add_special_tokens=False)
    assert encoded.count(ids.instruction) == encoded.count(ids.response) == encoded.count(ids.end) == 1
    assert encoded[-1] == ids.end
    assert tokenizer.decode(encoded) == DOLLY_TRAINING_WITH_INPUT
    # Idempotent: adding again changes nothing.
    assert prompts.add_special_tokens(tokenizer) == ids and len(tokenizer) == base_size + 3


def test_load_tokenizer_gives_same_ids_every_time(tiny_model_dir):
    first, second = prompts.load_tokenizer(tiny_model_dir), prompts.load_tokenizer(tiny_model_dir)
    assert prompts.add_special_tokens(first) == prompts.add_special_tokens(second)


def test_tokenizer_that_splits_a_key_is_refused(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # A tokenizer that cannot hold the keys as added tokens: encode splits "### End".
    tokenizer.add_special_tokens = lambda *args, **kwargs: 0
    with pytest.raises(prompts.SpecialTokenError, match=r"'### End' encodes to \d+ tokens"):
        prompts.add_special_tokens(tokenizer)


def test_extract_response_from_decoded_text():
    assert prompts.extract_response(DOLLY_TRAINING_WITH_INPUT) == "Ray scales Python."
    assert prompts.extract_response(DOLLY_GENERATION_NO_INPUT + "Blue and more") == "Blue and more"
    assert prompts.extract_response("no keys here") is None


def test_prompt_keys_inside_text_are_detected():
    assert prompts.contains_prompt_key("fine text") is None
    assert prompts.contains_prompt_key("then ### End of story") == prompts.END_KEY


def test_the_exported_chat_template_renders_the_training_prompt_byte_for_byte(tmp_path):
    tokenizer = testing.build_tokenizer(tmp_path / "base")
    prompts.add_special_tokens(tokenizer)
    tokenizer.chat_template = prompts.CHAT_TEMPLATE  # as the export does
    tokenizer.save_pretrained(str(tmp_path / "exported"))
    assert (tmp_path / "exported" / "chat_template.jinja").is_file()
    exported = AutoTokenizer.from_pretrained(str(tmp_path / "exported"))

    def render(messages, **kwargs):
        return exported.apply_chat_template(messages, tokenize=False, **kwargs)

    cases = [("Reverse the letters of the word.", "ray"), ("Name a primary color.", None), ("Two\nlines", "  \n"), ("Quote 'this'", "{{ not jinja }}\n")]
    for instruction, input in cases:
        prompt = prompts.format_prompt(instruction, input)
        user = {"role": "user", "content": instruction}
        system = [{"role": "system", "content": input}] if input is not None else []
        assert render(system + [user], add_generation_prompt=True) == prompt
        assert render([user], add_generation_prompt=True, input=input) == prompt
        # Earlier turns do not leak in: the last user message is the instruction.
        assert render(system + [{"role": "user", "content": "old"}, {"role": "assistant", "content": "x"}, user], add_generation_prompt=True) == prompt
        assert render(system + [user, {"role": "assistant", "content": "yar"}]) == prompts.format_training_text(instruction, "yar", input)
