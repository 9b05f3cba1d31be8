"""Building a small causal LM locally: a trained tokenizer plus seeded random weights.

No weights can be downloaded on an offline machine, so the quickstart, the tests
and the benchmarks build one here and load it back through the same
``from_pretrained`` path as any real model. It writes nonsense fluently: it is
for exercising the machinery, not for answers.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["CHAT_TEMPLATE", "build_tiny_model"]

CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<s>assistant:{% endif %}"
)

_CORPUS = (
    "Summarize the following support ticket in one sentence.",
    "Translate to French: the invoice is overdue and payment is required.",
    "Classify the sentiment of this review as positive, negative or neutral.",
    "Extract the product names mentioned in the text below.",
    "Write a short, friendly reply to the customer who asked about shipping times.",
    "The quick brown fox jumps over the lazy dog while the data pipeline runs overnight.",
    "Spot instances are cheap because the cloud provider can reclaim them at any time.",
)


def build_tiny_model(
    path: str | Path,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    vocab_size: int = 512,
    max_positions: int = 512,
    seed: int = 0,
    corpus: Iterable[str] = (),
    train_steps: int = 0,
) -> Path:
    """Write a Llama-architecture model and its tokenizer to ``path``; return it.

    ``train_steps`` > 0 fits the model to the little corpus for that many AdamW
    steps (a few seconds on a CPU), so it answers with corpus-like phrases instead
    of noise; 0 keeps the seeded random weights (what tests and benchmarks want).
    """
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(  # type: ignore[no-untyped-call,unused-ignore]  # typed in some tokenizers releases
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(_CORPUS) + list(corpus)
    tokenizer.train_from_iterator(texts * 20, trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    model.generation_config.pad_token_id = fast.pad_token_id
    if train_steps > 0:
        _fit(model, fast, texts, train_steps)
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # no "Writing model shards" bar
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def _fit(model: Any, tokenizer: Any, texts: list[str], steps: int) -> None:
    import torch

    batch = tokenizer(
        [f"{tokenizer.bos_token}{t}{tokenizer.eos_token}" for t in texts],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
