"""A tiny causal LM for tests and the CPU demo, saved as an ordinary Hugging Face model directory.

Nothing can be downloaded where rlvrw is tested, so the model is made here: a byte-level BPE tokenizer trained with
``tokenizers`` on the task's own text (prompts and gold answers), given a chat template, and a randomly initialized
Qwen2 or Llama with a few small layers. The directory then loads with ``AutoModelForCausalLM`` / ``AutoTokenizer``
like any model.
"""

from __future__ import annotations

from rlvrw import checks
from rlvrw.files import write_directory

PAD_TOKEN, TURN_START, TURN_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# One user turn, then the assistant's turn opened; the assistant's turn ends with the end-of-sequence token.
CHAT_TEMPLATE = (
    "{% for message in messages %}" + TURN_START + "{{ message['role'] }}\n{{ message['content'] }}" + TURN_END
    + "\n{% endfor %}{% if add_generation_prompt %}" + TURN_START + "assistant\n{% endif %}"
)
ARCHITECTURES = ("qwen2", "llama")


def train_tokenizer(texts, vocab_size: int = 2048):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts``: any text encodes (bytes are the base
    vocabulary); ``<|im_end|>`` ends a response, ``<|endoftext|>`` pads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    checks.integer("vocab_size", vocab_size, low=300)  # 256 bytes, the special tokens, some merges
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD_TOKEN, TURN_START, TURN_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=TURN_END, pad_token=PAD_TOKEN)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(arch: str, tokenizer, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                max_positions: int = 8192):
    """A Qwen2 or Llama config of the given small size for ``tokenizer``'s vocabulary."""
    from transformers import LlamaConfig, Qwen2Config

    configs = {"qwen2": Qwen2Config, "llama": LlamaConfig}
    if arch not in configs:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    if hidden_size % heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of heads ({heads})")
    return configs[arch](
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_positions, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_model(out_dir: str, texts, *, arch: str = "qwen2", vocab_size: int = 2048, hidden_size: int = 64,
                     layers: int = 2, heads: int = 4, seed: int = 0) -> str:
    """Train the tokenizer on ``texts``, initialize the model, save both to ``out_dir`` (written whole or not at
    all). Returns ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM

    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty list of str (the tokenizer's training text)")
    tokenizer = train_tokenizer(texts, vocab_size)
    config = tiny_config(arch, tokenizer, hidden_size, layers, heads)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    write_directory(out_dir, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    return out_dir
