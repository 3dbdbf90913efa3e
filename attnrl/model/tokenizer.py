"""The tiny default model's tokenizer: characters of the synthetic task plus a ``\\n\\n`` token.

It is a real ``tokenizers`` BPE model (a character vocabulary and one merge, ``\\n`` + ``\\n``),
so the step separator is one token whose text contains ``"\\n\\n"``, exactly as in the BPE
vocabularies of real models that step segmentation (spec §4) searches. It carries a chat
template and is saved with ``save_pretrained`` like any hub tokenizer.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
UNK = "<|unk|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SPECIAL_TOKENS = (EOS, UNK, USER, ASSISTANT)
# Everything the synthetic task and the verifier's answer format need, plus a little slack
# (letters, punctuation) so that a user's own small task does not hit <|unk|> at once.
CHARACTERS = tuple("0123456789+-*/=()[]{}<>\\^_.,:;!?'\" abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\n")
STEP_TOKEN = "\n\n"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}" + EOS + ""
    "{% else %}{{ raise_exception('the tiny chat template has no role ' + message['role']) }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh tokenizer for the tiny default model (deterministic: same ids every time)."""
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS, STEP_TOKEN))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("\n", "\n")], unk_token=UNK))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS, pad_token=EOS, unk_token=UNK, padding_side="left"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
