"""Build the random-weight Llamas (and their tokenizer) that the real-vLLM tiers serve.

Run by the *vLLM venv's* python, not the project's (it needs torch, transformers and
tokenizers, which the project does not depend on)::

    <vllm-venv>/bin/python -m concur_langgraph.testing.make_tiny_model OUT_DIR [--shape medium]

or as a plain script path. Nothing is downloaded: the byte-level BPE tokenizer is trained on
text generated here from a fixed seed, and the weights come from ``torch.manual_seed(0)``, so
two runs produce the same files.

Two shapes (:data:`SHAPES`), one tokenizer (vocabulary 2048, one token per word of the
benchmark agents' text):

* ``tiny`` (the default; the real tier's model): hidden 256, 4 layers x 4 KV heads x head_dim
  64 in bfloat16 costs ``2 (K and V) x 4 x 4 x 64 x 2 bytes = 4 KiB`` of KV cache per token, so
  a 16 MiB cache holds exactly 4096 tokens - small enough that a few dozen growing chats
  exhaust it on a CPU. 3.7M parameters: its steps are overhead-bound, recomputing a prompt
  costs almost nothing, so no admission policy can win on it.
* ``medium`` (the pressure regime, docs/real-vllm.md "The medium model"): hidden 1024,
  intermediate 2816, 8 layers, 16 query heads over 4 KV heads of dim 64, ~94M parameters:
  ``2 x 8 x 4 x 64 x 2 = 8 KiB`` per token (a 64 MiB cache holds 8192 tokens), and on two CPU
  cores a prefill of ~1,000 tokens/s, so re-prefilling a 2,000-token context costs seconds:
  thrashing costs what it costs on a GPU serving a large model, at a scale a CPU can run.

The weights are random, so the output is gibberish: callers control lengths with
``ignore_eos`` and ``max_tokens``.
"""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KV_BYTES_PER_TOKEN", "SHAPES", "ModelShape", "build", "main"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelShape:
    """The constants of one random-weight Llama (bfloat16, untied embeddings)."""

    name: str
    """``tiny`` or ``medium``: the model folder is ``<name>-model``."""
    hidden_size: int
    """Width of the residual stream (``num_heads x head_dim``)."""
    intermediate_size: int
    """Width of the MLP."""
    num_layers: int
    """Decoder layers."""
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (grouped-query attention when fewer than ``num_heads``)."""
    head_dim: int
    """Dimension of one head."""
    vocab_size: int = 2048
    """Tokens of the (shared) byte-level BPE tokenizer."""
    max_positions: int = 4096
    """``max_position_embeddings``: the longest ``--max-model-len`` the model accepts."""

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, per layer, per KV head, per dimension, 2 bytes (bfloat16)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2

    @property
    def params(self) -> int:
        """Parameters: embeddings and LM head (untied), attention, MLP and the norms."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attention = h * self.num_heads * self.head_dim * 2 + h * kv * 2
        mlp = 3 * h * self.intermediate_size
        per_layer = attention + mlp + 2 * h
        return 2 * self.vocab_size * h + self.num_layers * per_layer + h


SHAPES: dict[str, ModelShape] = {
    "tiny": ModelShape(
        name="tiny",
        hidden_size=256,
        intermediate_size=512,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,
        head_dim=64,
    ),
    "medium": ModelShape(
        name="medium",
        hidden_size=1024,
        intermediate_size=2816,
        num_layers=8,
        num_heads=16,
        num_kv_heads=4,
        head_dim=64,
        max_positions=8192,
    ),
}
"""Shape name -> constants. Changing one changes this file, so its model is rebuilt."""

VOCAB_SIZE = SHAPES["tiny"].vocab_size
MAX_POSITIONS = SHAPES["tiny"].max_positions
KV_BYTES_PER_TOKEN = SHAPES["tiny"].kv_bytes_per_token
"""The tiny model's KV bytes per token (4096)."""

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


def build(out: Path, shape: str = "tiny") -> dict[str, object]:
    """Write tokenizer and model files of ``shape`` into ``out``; return a summary (for logs)."""
    if shape not in SHAPES:
        raise ValueError(f"shape: unknown {shape!r}; known: {', '.join(sorted(SHAPES))}")
    dims = SHAPES[shape]
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
            vocab_size=dims.vocab_size,
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
        model_max_length=dims.max_positions,
    )
    hf_tok.chat_template = _CHAT_TEMPLATE
    hf_tok.save_pretrained(str(out))

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=dims.vocab_size,
        hidden_size=dims.hidden_size,
        intermediate_size=dims.intermediate_size,
        num_hidden_layers=dims.num_layers,
        num_attention_heads=dims.num_heads,
        num_key_value_heads=dims.num_kv_heads,
        head_dim=dims.head_dim,
        max_position_embeddings=dims.max_positions,
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
        "shape": shape,
        "params": sum(p.numel() for p in model.parameters()),
        "vocab": tok.get_vocab_size(),
        "kv_bytes_per_token": dims.kv_bytes_per_token,
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``make_tiny_model.py OUT_DIR [--shape NAME]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    shape = "tiny"
    if len(args) == 3 and args[1] == "--shape" and args[2] in SHAPES:
        shape = args[2]
        args = args[:1]
    if len(args) != 1:
        print(f"usage: make_tiny_model.py OUT_DIR [--shape {'|'.join(SHAPES)}]", file=sys.stderr)
        return 2
    print(json.dumps(build(Path(args[0]), shape)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
