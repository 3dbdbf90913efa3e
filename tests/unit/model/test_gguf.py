"""GGUF checkpoints (attnrl/model/gguf.py) on small files written with the ``gguf`` package's own writer:
metadata read from a file cut inside its tensors; the tokenizer rebuilt from a byte-level vocabulary, a few
merges, added tokens at fixed ids and unused padding rows after them, as in the R1-Distill GGUF
(stack-notes.md); a 1-layer Llama converted to a plain directory, tied and untied."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from attnrl.errors import ModelLoadError
from attnrl.model.gguf import CONTROL, UNUSED, USER_DEFINED, SpecialTokens, build_tokenizer, convert_model, read_metadata
from attnrl.model.loading import load_policy

BYTES = sorted(set(bytes_to_unicode().values()))
MERGES = ["Ċ Ċ", ". ĊĊ", "t h", "th e"]
BASE = BYTES + ["ĊĊ", ".ĊĊ", "th", "the"]
ADDED = [("<|end|>", CONTROL), ("<|bos|>", CONTROL), ("<think>", USER_DEFINED), ("</think>", USER_DEFINED)]
PADDING = ["[PAD0]", "[PAD1]", "[PAD2]"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}")
SPECIAL = SpecialTokens(bos="<|bos|>", eos="<|end|>", pad="<|end|>", add_bos=True)


def _metadata_file(path, *, tokenizer_model="gpt2", pre="deepseek-r1-qwen", bos_id=None, with_tensor=False):
    tokens = BASE + [token for token, _ in ADDED] + PADDING
    types = [1] * len(BASE) + [kind for _, kind in ADDED] + [UNUSED] * len(PADDING)
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(len(BASE) + 1 if bos_id is None else bos_id)
    writer.add_eos_token_id(len(BASE))
    writer.add_chat_template(TEMPLATE)
    if with_tensor:
        writer.add_tensor("token_embd.weight", np.arange(4096, dtype=np.float32).reshape(64, 64))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_metadata_reads_from_a_file_cut_inside_its_tensor_data(tmp_path):
    path = _metadata_file(tmp_path / "model.gguf", with_tensor=True)
    path.write_bytes(path.read_bytes()[:-1000])  # the first part of a split checkpoint
    with pytest.raises(Exception):
        gguf.GGUFReader(str(path))  # the library alone cannot: its tensor runs past the end
    metadata = read_metadata(path)
    assert metadata["tokenizer.ggml.pre"] == "deepseek-r1-qwen"
    assert metadata["tokenizer.ggml.tokens"] == BASE + [t for t, _ in ADDED] + PADDING
    assert metadata["tokenizer.ggml.merges"] == MERGES
    assert metadata["tokenizer.chat_template"] == TEMPLATE


def test_a_file_that_is_not_gguf_is_refused_by_name(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(ModelLoadError, match=r"weights\.bin: not a GGUF file"):
        read_metadata(path)


def test_the_rebuilt_tokenizer_keeps_every_id_of_the_file(tmp_path):
    tokenizer = build_tokenizer(read_metadata(_metadata_file(tmp_path / "t.gguf")), SPECIAL)
    for offset, (token, _) in enumerate(ADDED):
        assert tokenizer.convert_tokens_to_ids(token) == len(BASE) + offset
    assert len(tokenizer) == len(BASE) + len(ADDED)  # the unused padding rows are out of the vocabulary
    assert tokenizer.vocab_size == len(BASE)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (len(BASE) + 1, len(BASE),
                                                                                       len(BASE))
    ids = tokenizer("the end.\n\n</think>").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["<|bos|>", "the", "Ġ", "e", "n", "d", ".ĊĊ", "</think>"]
    # CONTROL tokens are special (decoding drops them), USER_DEFINED ones are text.
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the end.\n\n</think>"


def test_the_chat_template_writes_one_bos(tmp_path):
    tokenizer = build_tokenizer(read_metadata(_metadata_file(tmp_path / "t.gguf")), SPECIAL)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "the"}], add_generation_prompt=True,
                                        tokenize=True)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert ids[-2:] == [tokenizer.convert_tokens_to_ids("<think>"), BASE.index("Ċ")]


def test_special_tokens_that_disagree_with_the_file_are_refused(tmp_path):
    metadata = read_metadata(_metadata_file(tmp_path / "t.gguf", bos_id=len(BASE) + 2))
    with pytest.raises(ModelLoadError, match=r"bos token '<\|bos\|>' has id \d+, the GGUF file says \d+"):
        build_tokenizer(metadata, SPECIAL)


@pytest.mark.parametrize(("model", "pre", "message"), [
    ("llama", "deepseek-r1-qwen", "only byte-level BPE"),
    ("gpt2", "no-such-pre", "no split regex is known for the GGUF pre-tokenizer 'no-such-pre'"),
])
def test_tokenizers_it_cannot_rebuild_are_refused(tmp_path, model, pre, message):
    metadata = read_metadata(_metadata_file(tmp_path / "t.gguf", tokenizer_model=model, pre=pre))
    with pytest.raises(ModelLoadError, match=message):
        build_tokenizer(metadata, SPECIAL)


def test_an_added_token_inside_the_base_vocabulary_is_refused(tmp_path):
    metadata = read_metadata(_metadata_file(tmp_path / "t.gguf"))
    metadata["tokenizer.ggml.token_type"][3] = CONTROL
    with pytest.raises(ModelLoadError, match="not base tokens followed by added and unused ones"):
        build_tokenizer(metadata, SPECIAL)


def _llama_file(path, *, tied: bool, endoftext: bool = True):
    """A 1-layer Llama in float32 GGUF (llama.cpp's tensor names), with the byte-level tokenizer above and, as
    GPT-2-family vocabularies have, a control token ``<|endoftext|>``."""
    added = ADDED + [("<|endoftext|>", CONTROL)] * endoftext
    hidden, heads, kv_heads, ffn, vocab = 64, 4, 2, 96, len(BASE) + len(added)
    rng = np.random.default_rng(0)

    def weight(*shape):
        return (0.2 * rng.standard_normal(shape)).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((writer.add_block_count, 1), (writer.add_context_length, 128), (writer.add_embedding_length, hidden),
                       (writer.add_feed_forward_length, ffn), (writer.add_head_count, heads),
                       (writer.add_head_count_kv, kv_heads), (writer.add_rope_freq_base, 10000.0),
                       (writer.add_layer_norm_rms_eps, 1e-5), (writer.add_vocab_size, vocab),
                       (writer.add_rope_dimension_count, hidden // heads)):
        add(value)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(BASE + [token for token, _ in added])
    writer.add_token_types([1] * len(BASE) + [kind for _, kind in added])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(len(BASE) + 1)
    writer.add_eos_token_id(len(BASE))
    writer.add_chat_template(TEMPLATE)
    tensors = {"token_embd.weight": weight(vocab, hidden), "output_norm.weight": 1 + weight(hidden),
               "blk.0.attn_norm.weight": 1 + weight(hidden), "blk.0.ffn_norm.weight": 1 + weight(hidden),
               "blk.0.attn_q.weight": weight(hidden, hidden), "blk.0.attn_k.weight": weight(hidden // 2, hidden),
               "blk.0.attn_v.weight": weight(hidden // 2, hidden), "blk.0.attn_output.weight": weight(hidden, hidden),
               "blk.0.ffn_gate.weight": weight(ffn, hidden), "blk.0.ffn_up.weight": weight(ffn, hidden),
               "blk.0.ffn_down.weight": weight(hidden, ffn)}
    if not tied:
        tensors["output.weight"] = weight(vocab, hidden)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("tied", [True, False])
def test_a_converted_checkpoint_loads_as_a_plain_directory_with_the_gguf_models_logits(tmp_path, tied):
    path = _llama_file(tmp_path / "tiny.gguf", tied=tied)
    out = convert_model(path, tmp_path / "converted")
    assert "quantization_config" not in (out / "config.json").read_text()
    policy = load_policy(out)
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([[len(BASE) + 1, 5, 17, 200, 33, 90]])
    with torch.no_grad():
        assert torch.equal(policy.model(ids).logits, reference(ids).logits)
    model = policy.model
    assert model.config.tie_word_embeddings is tied
    assert (model.lm_head.weight is model.get_input_embeddings().weight) is tied
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    assert policy.tokenizer.eos_token_id == len(BASE) and policy.tokenizer.chat_template == TEMPLATE


def test_a_conversion_that_adds_tokens_past_the_embedding_is_refused(tmp_path):
    # Without '<|endoftext|>' in the file, transformers' GPT-2 conversion adds it at a new id: one past the rows.
    path = _llama_file(tmp_path / "tiny.gguf", tied=True, endoftext=False)
    with pytest.raises(ModelLoadError, match=r"conversion added \['<\|endoftext\|>'\] past the model's 264 embedding"):
        convert_model(path, tmp_path / "converted")
    assert not (tmp_path / "converted").exists()
