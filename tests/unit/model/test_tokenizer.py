from __future__ import annotations

from attnrl.model.loading import load_tokenizer
from attnrl.model.tokenizer import ASSISTANT, EOS, STEP_TOKEN, USER, build_tokenizer
from attnrl.rollout.prompts import decode_response, encode_prompt


def test_text_round_trips_and_blank_line_is_one_token():
    tokenizer = build_tokenizer()
    text = "8-7\n\n1\n\n\\boxed{1}"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    step_id = tokenizer.convert_tokens_to_ids(STEP_TOKEN)
    assert ids.count(step_id) == 2
    assert "\n\n" in tokenizer.decode([step_id])


def test_chat_template_and_generation_prompt():
    tokenizer = build_tokenizer()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "3+5"}], add_generation_prompt=True, tokenize=False)
    assert text == f"{USER}3+5{ASSISTANT}"
    ids = encode_prompt(tokenizer, [{"role": "user", "content": "3+5"}])
    assert tokenizer.decode(ids) == text
    assert decode_response(tokenizer, tokenizer.encode("\\boxed{8}", add_special_tokens=False) + [tokenizer.eos_token_id]) == "\\boxed{8}"
    assert tokenizer.eos_token == tokenizer.pad_token == EOS


def test_saved_tokenizer_reloads_identically(tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "qwen2"}')  # beside a qwen2 model, as saved
    reloaded = load_tokenizer(tmp_path)
    text = "Q: 3 + 5 = ?\n\n\\boxed{8}"
    assert reloaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    assert reloaded.decode(reloaded.encode(text, add_special_tokens=False)) == text
    assert reloaded.chat_template == tokenizer.chat_template and reloaded.padding_side == "left"
