"""Build the tiny random-weight Llama (and its tokenizer) that the real-vLLM tier serves.

Run by the *vLLM venv's* python, not the project's (it needs torch, transformers and
tokenizers, which the project does not depend on)::

    <vllm-venv>/bin/python -m concur_langgraph.testing.make_tiny_model OUT_DIR

or as a plain script path. Nothing is downloaded: the byte-level BPE tokenizer is trained on
text generated here from a fixed seed, and the weights come from ``torch.manual_seed(0)``, so
two runs produce the same files.

Why this shape: 4 layers x 4 KV heads x head_dim 64 in bfloat16 costs
``2 (K and V) x 4 x 4 x 64 x 2 bytes = 4 KiB`` of KV cache per token, so a 16 MiB cache holds
exactly 4096 tokens - small enough that a few dozen growing chats exhaust it on a CPU. The
weights are random, so the output is gibberish: callers control lengths with ``ignore_eos`` and
``max_tokens``.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

__all__ = ["KV_BYTES_PER_TOKEN", "build", "main"]

VOCAB_SIZE = 2048
HIDDEN_SIZE = 256
INTERMEDIATE_SIZE = 512
NUM_LAYERS = 4
NUM_KV_HEADS = 4
HEAD_DIM = 64
MAX_POSITIONS = 4096
# K and V, per layer, per KV head, per dimension, 2 bytes (bfloat16).
KV_BYTES_PER_TOKEN = 2 * NUM_LAYERS * NUM_KV_HEADS * HEAD_DIM * 2

_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
_WORDS = (
    "the cache token request server model queue block prefix memory user assistant hello "
    "world what is a an of to and in for on with how why please explain tell me about story "
    "number data"
).split()
# ChatML: the same framing real chat models use, so prompts grow the way they do in practice.
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus(n_lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 20)))
        lines.append(f"{words}{rng.choice('.?!,')} {rng.randint(0, 99999)}".capitalize())
    return lines


def build(out: Path) -> dict[str, object]:
    """Write tokenizer and model files into ``out``; return a summary (for logs)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Imported here: these exist only in the vLLM venv, never in the project's.
    import torch  # type: ignore[import-not-found]
    from tokenizers import (  # type: ignore[import-not-found]
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import (  # type: ignore[import-not-found]
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(
        _corpus(20000, seed=0),
        trainer=trainers.BpeTrainer(
            vocab_size=VOCAB_SIZE,
            special_tokens=_SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "</s>"],
        model_max_length=MAX_POSITIONS,
    )
    hf_tok.chat_template = _CHAT_TEMPLATE
    hf_tok.save_pretrained(str(out))

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_KV_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=hf_tok.convert_tokens_to_ids("<s>"),
        eos_token_id=hf_tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=hf_tok.convert_tokens_to_ids("<pad>"),
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(out), safe_serialization=True)
    return {
        "out": str(out),
        "params": sum(p.numel() for p in model.parameters()),
        "vocab": tok.get_vocab_size(),
        "kv_bytes_per_token": KV_BYTES_PER_TOKEN,
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``make_tiny_model.py OUT_DIR``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: make_tiny_model.py OUT_DIR", file=sys.stderr)
        return 2
    print(json.dumps(build(Path(args[0]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
