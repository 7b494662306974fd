"""The hybrid ranking on its own (proxy/search.py): words, BM25 against SQLite's own FTS5, fusion."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from proxy.search import DENSE, Fusion, Lexicon, Question, fuse, hybrid, joined, mixed, question, reciprocal_rank, terms
from proxy.store.sqlite import db

EVERY_WORD = Fusion(common_share=1.0, common_floor=10**9)
WORDS = ["tea", "coffee", "lisbon", "oslo", "sister", "cello", "marathon", "allergic", "peanuts", "dog", "cat",
         "works", "nurse", "2019", "march", "vegan"]


def corpus(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9))) for _ in range(count)]


def test_terms_fold_case_accents_and_punctuation() -> None:
    assert terms("Zoë moved to ZÜRICH, in 2019!") == ["zoe", "moved", "to", "zurich", "in", "2019"]
    assert terms("L'été d'Anna: crème brûlée") == ["l", "ete", "d", "anna", "creme", "brulee"]
    assert terms("Straße") == ["strasse"]
    assert terms("snake_case and-dashes") == ["snake", "case", "and", "dashes"]
    assert terms("東京が好き") == ["東", "京", "か", "好", "き"]  # ideographs and kana one by one
    assert terms("") == [] and terms("?!") == []


def fts5_scores(texts: list[str], query: list[str]) -> dict[int, float]:
    """SQLite FTS5's bm25() (k1 1.2, b 0.75) of each matching row, as a positive number (FTS5 negates it)."""
    conn = db.connect(":memory:")
    conn.execute("CREATE VIRTUAL TABLE docs USING fts5(body, tokenize = 'unicode61 remove_diacritics 0')")
    conn.executemany("INSERT INTO docs (rowid, body) VALUES (?, ?)",
                     [(n, " ".join(terms(text))) for n, text in enumerate(texts)])
    match = " OR ".join(f'"{word}"' for word in query)
    rows = conn.execute("SELECT rowid, -bm25(docs) FROM docs WHERE docs MATCH ?", (match,)).fetchall()
    conn.close()
    return {int(row): float(score) for row, score in rows}


@pytest.mark.parametrize("seed", range(6))
def test_bm25_is_sqlite_fts5s(seed: int) -> None:
    texts = corpus(40, seed)
    query = random.Random(seed).sample(WORDS, 3)
    ours = Lexicon.build(texts).scores(query, np.ones(len(texts), dtype=bool), EVERY_WORD)
    theirs = fts5_scores(texts, query)
    assert set(np.flatnonzero(ours)) == set(theirs)
    # Ours is divided by the query's ceiling: one constant for every row.
    ratios = [ours[row] / score for row, score in theirs.items() if score > 1e-5]
    assert ratios and max(ratios) == pytest.approx(min(ratios), rel=1e-4)
    documents = len(texts)
    ceiling = 0.0
    for word in query:
        frequency = sum(word in terms(text) for text in texts)
        ceiling += max(math.log((documents - frequency + 0.5) / (frequency + 0.5)), 1e-6) * 2.2
    assert ratios[0] == pytest.approx(1 / ceiling, rel=1e-4)


def test_scores_are_shares_below_one() -> None:
    texts = ["my sister plays the cello", "my sister lives in oslo", "my dog", "tea", "coffee", "a cat"]
    lexicon = Lexicon.build(texts)
    scores = lexicon.scores(terms("cello oslo"), np.ones(6, dtype=bool), EVERY_WORD)
    assert 0 < scores[0] < 1 and 0 < scores[1] < 1 and scores[2:].tolist() == [0] * 4
    # A word none of the memories holds is part of the question: the same memories hold a smaller share of it.
    diluted = lexicon.scores(terms("cello oslo zebra"), np.ones(6, dtype=bool), EVERY_WORD)
    assert 0 < diluted[0] < scores[0] and diluted[0] / scores[0] == pytest.approx(diluted[1] / scores[1])


def test_common_words_are_not_searched() -> None:
    texts = [f"my note number {n}" for n in range(40)] + ["my sister plays the cello"]
    lexicon = Lexicon.build(texts)
    alive = np.ones(len(texts), dtype=bool)
    scores = lexicon.scores(terms("my cello"), alive, Fusion(common_share=0.05))
    assert np.flatnonzero(scores).tolist() == [40]  # "my" is in every memory: it finds nothing
    assert lexicon.scores(terms("my"), alive, Fusion(common_share=0.05)).sum() == 0
    assert np.count_nonzero(lexicon.scores(terms("my"), alive, EVERY_WORD)) == 41
    # Few memories: a word in 2 of them (the floor) is still searched.
    small = Lexicon.build(["my cat", "my dog", "tea"])
    assert np.count_nonzero(small.scores(["my"], np.ones(3, dtype=bool), Fusion(common_share=0.05))) == 2


def test_statistics_are_over_the_alive_rows_only() -> None:
    texts = ["cello"] * 5 + ["cello and piano", "piano"]
    lexicon = Lexicon.build(texts)
    alive = np.array([False] * 5 + [True, True])
    alone = Lexicon.build(texts[5:]).scores(["cello"], np.ones(2, dtype=bool), EVERY_WORD).tolist()
    assert alone[0] > 0
    assert lexicon.scores(["cello"], alive, EVERY_WORD).tolist() == pytest.approx([0.0] * 5 + alone)


@pytest.mark.parametrize("seed", range(5))
def test_extend_and_keep_equal_a_fresh_build(seed: int) -> None:
    rng = random.Random(seed)
    texts = corpus(60, seed)
    lexicon = Lexicon.build(texts[:20])
    for start in range(20, 60, 7):
        lexicon = lexicon.extend(texts[start:start + 7])
    kept = np.array([rng.random() > 0.3 for _ in texts])
    compacted = lexicon.keep(kept)
    fresh = Lexicon.build(text for text, keep in zip(texts, kept, strict=True) if keep)
    for query in (["tea", "oslo"], ["march", "2019", "vegan"], ["nothing"]):
        assert compacted.scores(query, np.ones(len(fresh), dtype=bool), EVERY_WORD) == pytest.approx(
            fresh.scores(query, np.ones(len(fresh), dtype=bool), EVERY_WORD))
        assert lexicon.scores(query, kept, EVERY_WORD)[kept] == pytest.approx(
            fresh.scores(query, np.ones(len(fresh), dtype=bool), EVERY_WORD))


def test_an_older_lexicon_is_untouched_by_extend() -> None:
    first = Lexicon.build(["tea", "coffee"])
    before = first.scores(["tea"], np.ones(2, dtype=bool), EVERY_WORD).copy()
    second = first.extend(["tea with lemon", "brand new words"])
    assert first.scores(["tea"], np.ones(2, dtype=bool), EVERY_WORD) == pytest.approx(before)
    assert len(first) == 2 and len(second) == 4
    assert first.scores(["brand"], np.ones(2, dtype=bool), EVERY_WORD).tolist() == [0, 0]


def test_fusion_keeps_each_side() -> None:
    dense = np.array([0.6, 0.3, -np.inf, 0.1])
    lexical = np.array([0.0, 0.8, 0.9, 0.0])
    assert fuse(dense, lexical, Fusion(lexical_weight=0.5)).tolist() == pytest.approx([0.6, 0.7, -np.inf, 0.1])
    assert fuse(dense, lexical, DENSE).tolist() == pytest.approx([0.6, 0.3, -np.inf, 0.1])
    only_words = fuse(dense, lexical, Fusion(lexical_weight=1.0, dense_weight=0.0))
    assert only_words.tolist() == [-np.inf, 0.8, -np.inf, -np.inf]  # replaced/expired rows stay out


def test_hybrid_lifts_the_memory_that_holds_the_rare_word() -> None:
    texts = ["my sister lives in Oslo", "my brother likes tea", "my dog is called Rex"] + [
        f"my colleague number {n} bakes bread" for n in range(30)]
    lexicon = Lexicon.build(texts)
    dense = np.array([0.30, 0.32] + [0.2] * 31)  # vectors alone would put the brother first
    fused = hybrid(dense, "Where does my sister live?", lexicon, Fusion(lexical_weight=0.5))
    assert int(np.argmax(fused)) == 0
    assert hybrid(dense, "Where does my sister live?", lexicon, DENSE).tolist() == dense.tolist()
    assert hybrid(dense, "", lexicon, Fusion()).tolist() == dense.tolist()  # no words: vectors only


def test_reciprocal_rank_fusion() -> None:
    dense = np.array([0.9, 0.5, 0.1, -np.inf])
    lexical = np.array([0.0, 0.2, 0.9, 0.8])
    fused = reciprocal_rank(dense, lexical, k=60)
    assert fused.tolist() == pytest.approx([1 / 61, 1 / 62 + 1 / 63, 1 / 63 + 1 / 61, -np.inf])


def test_question_is_the_last_user_message_with_the_one_before() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where do I live?"},
                {"role": "assistant", "content": "In Lisbon."},
                {"role": "user", "content": [{"type": "text", "text": "And my sister?"}, {"type": "image_url"}]}]
    asked = question(messages)
    assert asked == "And my sister?" and asked.before == "Where do I live?"
    assert question(messages[:2]) == "Where do I live?" and question(messages[:2]).before == ""
    assert question([]) == "" and question([{"role": "system", "content": "x"}, "junk"]) == ""
    assert joined(messages) == "Where do I live?\nAnd my sister?"
    assert joined(messages, ("user", "assistant")) == "Where do I live?\nIn Lisbon.\nAnd my sister?"


def test_the_message_before_weighs_in_a_little() -> None:
    last, before = np.eye(4, dtype=np.float32)[:2]
    vector = mixed(last, before)
    assert float(np.linalg.norm(vector)) == pytest.approx(1.0)
    assert float(vector @ last) > float(vector @ before) > 0
    assert mixed(last, None) is last
    texts = ["my sister lives in Oslo", "I live in Lisbon", *(f"filler {n}" for n in range(30))]
    lexicon = Lexicon.build(texts)
    dense = np.zeros(len(texts))
    alone = hybrid(dense, Question("And my sister?"), lexicon, Fusion(lexical_weight=0.5))
    after = hybrid(dense, Question("And my sister?", "Where do I live, Lisbon?"), lexicon, Fusion(lexical_weight=0.5))
    # Its words are not searched: they lifted memories about the previous topic over the answer (bench.quality).
    assert after.tolist() == pytest.approx(alone.tolist()) and alone[1] == 0 < alone[0]
