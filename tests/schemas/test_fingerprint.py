"""Fingerprints: the same question on the same model is one key; anything that changes the answer is another."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.jobs.models import lane_identity, model_identity
from schemas.backends import ApiProvider, GpuPool
from schemas.fingerprint import fingerprint
from schemas.inference import Request


def key(request: Request, identity: str = "local:m", task: str = "generate") -> str | None:
    return fingerprint(request, identity, task)


def test_what_changes_the_answer_changes_the_key() -> None:
    base = Request(prompt="Q: 2+2=\nA: ", max_tokens=8)
    assert key(base) == key(Request(prompt="Q: 2+2=\nA: ", max_tokens=8))
    others = [
        Request(prompt="Q: 2+2=\nA:", max_tokens=8),  # a raw completion after a space is another question
        Request(prompt="Q: 2+2=\nA: ", max_tokens=9),
        Request(prompt="Q: 2+2=\nA: ", max_tokens=8, response_schema='{"type": "integer"}'),
        Request(messages=[{"role": "user", "content": "Q: 2+2=\nA: "}], max_tokens=8),
    ]
    assert len({key(base), *(key(r) for r in others)}) == 1 + len(others)
    assert key(base, "local:other") != key(base) and key(base, task="embed") != key(base)
    assert key(Request(prompt="Q", max_tokens=8, temperature=0.7)) is None  # sampled: never shared
    alice = Request(messages=[{"role": "user", "content": "hi", "name": "alice"}], max_tokens=8)
    bob = Request(messages=[{"role": "user", "content": "hi", "name": "bob"}], max_tokens=8)
    assert key(alice) != key(bob)  # every field of a message is sent, so every field counts


def test_a_lane_is_part_of_the_model_and_weights_retrained_in_place_are_another_model(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"\x01" * 4096)
    before = model_identity(str(folder))
    model_identity.cache_clear()
    (folder / "model.safetensors").write_bytes(b"\x02" * 4096)  # the same size and config: retrained
    assert model_identity(str(folder)) != before
    model_identity.cache_clear()

    one = ApiProvider(name="one", base_url="http://127.0.0.1:1/v1", models={"m": "gpt-x"})
    two = ApiProvider(name="two", base_url="http://127.0.0.1:2/v1", models={"m": "llama-y"})
    lanes = {lane_identity(one, "m"), lane_identity(two, "m"), lane_identity(GpuPool(name="local"), "m")}
    assert len(lanes) == 3  # one name, three models: a chat on two providers, a raw continuation on a GPU
    assert lane_identity(GpuPool(name="a"), str(folder)) == lane_identity(GpuPool(name="b"), str(folder))


def test_a_hub_model_is_the_snapshot_in_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hub

    def snapshot(revision: str, weights: bytes) -> None:
        repo = tmp_path / "models--org--tiny"
        (repo / "snapshots" / revision).mkdir(parents=True, exist_ok=True)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
        (repo / "snapshots" / revision / "config.json").write_text('{"model_type": "llama"}')
        (repo / "snapshots" / revision / "model.safetensors").write_bytes(weights)

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    model_identity.cache_clear()
    assert model_identity("org/tiny") == "org/tiny"  # nothing cached: its name
    snapshot("aaaa", b"\x01" * 64)
    model_identity.cache_clear()
    first = model_identity("org/tiny")
    snapshot("bbbb", b"\x02" * 64)  # a new revision becomes main
    model_identity.cache_clear()
    assert first.startswith("folder:") and model_identity("org/tiny") not in (first, "org/tiny")
    model_identity.cache_clear()
