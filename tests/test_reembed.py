"""`memory-proxy reembed` on both engines: every vector redone for the new model, resumable, and a store never
serves two models' vectors (a store made by another model, or half re-embedded, refuses to open)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pytest

from proxy import config
from proxy.cli import main
from proxy.embed import HashEmbedder, Vector, configured_model
from proxy.errors import ConfigError, StoreError
from proxy.models import NewMemory
from proxy.reembed import reembed
from proxy.store import open_store
from proxy.store.sqlite import SqliteStore
from tests.pgserver import postgres_databases, postgres_location, postgres_server  # noqa: F401
from tests.test_store import location  # noqa: F401  (the engines" fixture)

OLD, NEW = HashEmbedder(64), HashEmbedder(96)
WORDS = ["tea", "jazz", "Oslo", "cats", "chess", "rowing", "Lisbon", "basil", "violin", "judo", "tango", "kayaks"]
TEXTS = [f"{a} and {b}" for a in WORDS for b in WORDS if a < b][:60]


class Failing(HashEmbedder):
    """The new model, failing after `runs` batches (a crash in the middle of a re-embedding)."""

    def __init__(self, dimension: int, runs: int) -> None:
        super().__init__(dimension)
        self.name = f"hash-{dimension}"
        self.runs = runs

    async def embed(self, texts: Sequence[str]) -> Vector:
        if self.runs <= 0:
            raise RuntimeError("the model crashed")
        self.runs -= 1
        return await super().embed(texts)


async def fill(url: str) -> tuple[str, int]:
    """Memories of two users, history included, made by the old model; (the replaced memory's id, rows)."""
    store = await open_store(url, dimension=OLD.dimension, model=OLD.name)
    try:
        await store.add("alice", [NewMemory(t) for t in TEXTS[:40]], OLD.encode(TEXTS[:40]))
        [old] = await store.add("bob", [NewMemory("lives in Paris")], OLD.encode(["lives in Paris"]))
        await store.add("bob", [NewMemory("lives in Rome", replaces=old.id)], OLD.encode(["lives in Rome"]))
        await store.add("bob", [NewMemory(t) for t in TEXTS[40:]], OLD.encode(TEXTS[40:]))
        rows = sum([len(await store.list(user, 1000, include_history=True)) for user in ("alice", "bob")])
        return old.id, rows
    finally:
        await store.close()


async def test_a_store_refuses_another_models_vectors(location: str) -> None:  # noqa: F811
    await fill(location)
    with pytest.raises(StoreError, match="hash-64"):
        await open_store(location, dimension=OLD.dimension, model="another-64-dimensional-model")
    with pytest.raises(StoreError, match="dimension"):
        await open_store(location, dimension=NEW.dimension, model=NEW.name)
    await (await open_store(location, dimension=OLD.dimension)).close()  # no model named: nothing checked


async def test_reembed_redoes_every_vector_history_included(location: str) -> None:  # noqa: F811
    old, rows = await fill(location)
    assert rows > 50
    seen: list[int] = []
    done = await reembed(location, NEW, batch=16, progress=lambda p: seen.append(p.done))
    assert (done.done, done.total, done.resumed) == (rows, rows, False) and seen == sorted(seen) and seen[-1] == rows
    store = await open_store(location, dimension=NEW.dimension, model=NEW.name)
    try:
        [hit] = await store.search("bob", NEW.encode(["lives in Rome"])[0], k=1)
        assert hit.score == pytest.approx(1.0, abs=1e-5)  # the new model's vector, exactly
        history = await store.get("bob", old)
        assert history is not None and history.superseded_by is not None  # history kept as it was
    finally:
        await store.close()
    assert (await reembed(location, NEW)).done == rows  # already done: nothing changes


async def test_an_interrupted_reembed_resumes_and_blocks_serving(location: str) -> None:  # noqa: F811
    _, rows = await fill(location)
    with pytest.raises(RuntimeError, match="crashed"):
        await reembed(location, Failing(96, runs=2), batch=10)
    for dimension, model in ((OLD.dimension, OLD.name), (NEW.dimension, NEW.name)):
        with pytest.raises(StoreError, match="re-embedded"):
            await open_store(location, dimension=dimension, model=model)
    with pytest.raises(ConfigError, match="hash-96"):
        await reembed(location, HashEmbedder(32))
    done = await reembed(location, Failing(96, runs=100), batch=10)
    assert (done.done, done.total, done.resumed) == (rows, rows, True)
    store = await open_store(location, dimension=NEW.dimension, model=NEW.name)
    try:
        found = await store.search("alice", NEW.encode([TEXTS[3]])[0], k=40)
        assert found[0].memory.text == TEXTS[3] and found[0].score == pytest.approx(1.0, abs=1e-5)
    finally:
        await store.close()


def test_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio

    path = str(tmp_path / "memory.db")
    _, rows = asyncio.run(fill(path))
    assert main(["reembed", "--db", path, "--batch", "32"], environ={"HOME": str(tmp_path)}) == 0
    captured = capsys.readouterr()
    assert f"{rows} of {rows} texts re-embedded for use-multilingual-v3" in captured.out
    assert f"32 of {rows}" in captured.err
    assert main(["reembed", "--db", str(tmp_path / "missing.db")], environ={"HOME": str(tmp_path)}) == 2
    assert "no SQLite memory store" in capsys.readouterr().err




async def test_migrate_carries_the_model_along(tmp_path: Path) -> None:
    from proxy.migrate import copy

    source, target = str(tmp_path / "source.db"), str(tmp_path / "target.db")
    await fill(source)
    copied = await copy(source, target)
    assert copied.read == copied.written > 50
    with pytest.raises(StoreError, match="hash-64"):
        await open_store(target, dimension=OLD.dimension, model="another-64-dimensional-model")
    store = await open_store(target, dimension=OLD.dimension, model=OLD.name)
    await store.close()


@pytest.mark.parametrize(("dimension", "recorded", "expected"), [
    (384, None, "minilm-l6"),  # a store made before models were recorded: all-MiniLM-L6-v2's vectors
    (384, "all-MiniLM-L6-v2-int8", "minilm-l6"),
    (512, "use-multilingual-v3", "use-multilingual"),
    (None, None, "use-multilingual"),  # no store yet: the default
])
def test_an_unset_model_is_the_one_the_store_was_made_with(tmp_path: Path, dimension: int | None,
                                                            recorded: str | None, expected: str) -> None:
    """An upgrade that changed the default model must not stop a proxy whose store holds the old model's vectors."""
    path = tmp_path / "m.db"
    if dimension is not None:
        async def make() -> None:
            store = await SqliteStore.open(str(path), dimension=dimension, dedupe_similarity=0.9, model=recorded)
            await store.close()
        asyncio.run(make())
    settings = config.load(environ={"HOME": str(tmp_path)}, overrides={"db": str(path)})
    assert settings.model == "" and configured_model(settings) == expected
    assert configured_model(dataclasses.replace(settings, model="minilm-l6")) == "minilm-l6"  # set: as set
