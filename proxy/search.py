"""Pure: hybrid ranking of one user's memories, keyword (BM25) beside the vectors, fused into one score.

Why our own BM25 and not the engines' full-text search: recall ranks *one user's* memories, so the statistics
(how rare a word is, how long a memory is on average) must be that user's. SQLite FTS5's bm25() and a
PostgreSQL full-text index count every user in the table: another user's memories would move this user's
ranking (a leak between tenants, and a test in tests/test_store.py forbids it), and PostgreSQL's ts_rank is not
BM25 at all. So both engines keep a `Lexicon` per user beside the cached vectors and rank with the same code
here: the same data gives the same ranking on either engine. The score is FTS5's bm25() exactly (k1 = 1.2,
b = 0.75, idf = ln((N - df + 0.5) / (df + 0.5)), floored at 1e-6), which tests/test_search.py checks against
SQLite's own FTS5 on one user's memories.

Fusion (measured with `python -m bench.quality`): the fused score stays on the cosine scale,

    score = cosine + lexical_weight * matched

where `matched` in [0, 1) is the memory's BM25 divided by the most any memory could score for the question
(the sum over its searched words of idf * (k1 + 1), words no memory holds included): the share of the
question's rare-word weight the memory holds. A memory no word of the question reaches keeps its cosine, so
`min_similarity` keeps its meaning for pure vector matches, and a keyword match lowers the bar by at most
`lexical_weight`. Words held by more than `common_share` of the user's memories (and by more than
`common_floor` of them) are not searched at all: "my", "I", "the user" match everything and drown the rare words
(3%, not the 5% first measured: "travail" in four of a hundred French memories still lifted the wrong ones). The message
before the question weighs in through its vector only: its words lifted memories about the previous topic.
Measured with `python -m bench.quality --variants`, on the shipped set and on sets generated with other seeds
(`--seed`): reciprocal-rank fusion lost R@1 on paraphrased questions and on English facts; the weighted score
kept dense's R@5 and R@10 there and lifted the rest (README: Recall).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from proxy.rewrite import message_text

K1 = 1.2
B = 0.75
FLOOR_IDF = 1e-6  # FTS5's floor for words held by half the memories or more
# Ideographs and kana are searched one character at a time (no spaces between words); every other run of letters
# and digits is a word.
IDEOGRAPH = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
TOKEN = re.compile(f"[{IDEOGRAPH}]|[^\\W_{IDEOGRAPH}]+")
WORD = re.compile(r"[^\W_]+")
HAS_IDEOGRAPH = re.compile(f"[{IDEOGRAPH}]")
MARKS = re.compile(r"[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f\u3099\u309a]")

Rows = npt.NDArray[np.int32]
Vector = npt.NDArray[np.float32]
Scores = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]


def terms(text: str) -> list[str]:
    """The words of a text as the lexical index holds them: case-folded, accents removed ("Été" → "ete"),
    split on anything that is not a letter or digit; ideographs one by one."""
    folded = text.casefold()
    if folded.isascii():  # most memories: nothing to decompose
        return WORD.findall(folded)
    folded = MARKS.sub("", unicodedata.normalize("NFKD", folded))
    return (TOKEN if HAS_IDEOGRAPH.search(folded) else WORD).findall(folded)


@dataclass(frozen=True, slots=True)
class Fusion:
    """How dense and lexical scores combine. `lexical_weight` 0 is vectors only; `dense_weight` 0 ranks by
    keywords alone (only memories that share a searched word with the question). `common_share`: words in more
    than this share of the user's memories (and in more than `common_floor` of them) are not searched."""

    lexical_weight: float = 0.5
    dense_weight: float = 1.0
    common_share: float = 0.03
    common_floor: int = 2

    @property
    def lexical(self) -> bool:
        return self.lexical_weight > 0


DENSE = Fusion(lexical_weight=0.0)
PREVIOUS_WEIGHT = 0.3  # how much the user's message before the question counts (bench.quality: "query" rows)


QUESTION_CHARS = 2000


class Question(str):
    """What recall searches for: the last user message (this string: sessions, logs and the API see only it), and
    `before`, the user's message before it. Recall weighs `before` into the vector at PREVIOUS_WEIGHT (the two
    vectors summed), so "And my sister?" leans towards the sister after "Where do I live?", while a question on a
    new topic is barely moved by the old one; its words are not searched. Measured against searching the last
    message alone, the two messages joined into one text, and `before`'s words weighed in too:
    `python -m bench.quality --variants`."""

    before: str

    def __new__(cls, text: str, before: str = "") -> Question:
        made = super().__new__(cls, text)
        made.before = before
        return made


def question(messages: Sequence[Any]) -> Question:
    """The Question of a chat request's messages (the last user message, and the user's message before it), each
    clipped to QUESTION_CHARS: a model reads a few hundred tokens of it at most, and a 30 MB message must cost
    recall no more than a short one."""
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        return Question("")
    return Question(clipped(message_text(users[-1])), clipped(message_text(users[-2])) if len(users) > 1 else "")


def clipped(text: str, limit: int = QUESTION_CHARS) -> str:
    """`text`, or its start and its end when longer than `limit` (the question of a long paste is at one end)."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return text[:half] + "\n…\n" + text[-half:]


def joined(messages: Sequence[Any], roles: tuple[str, ...] = ("user",)) -> str:
    """The baseline `question` is measured against: the turn before the last user message (its messages of
    `roles`) and that message, joined into one text."""
    users = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        return ""
    start = users[-2] if len(users) > 1 else users[-1]
    return "\n".join(message_text(m) for m in messages[start:users[-1] + 1]
                     if isinstance(m, dict) and m.get("role") in roles)


def mixed(last: Vector, before: Vector | None) -> Vector:
    """The question's vector: the last message's, plus PREVIOUS_WEIGHT x the message before's, at unit length."""
    if before is None:
        return last
    summed = (last + PREVIOUS_WEIGHT * before).astype(np.float32)
    norm = float(np.linalg.norm(summed))
    return (summed / np.float32(norm)).astype(np.float32) if norm else last


@dataclass(frozen=True, slots=True)
class Lexicon:
    """An inverted index of one user's memories, aligned with the rows of their vector matrix.

    Postings are held sorted by word id (CSR): `starts[w]:starts[w + 1]` are the rows holding word w and how
    often. Immutable: `extend` returns a new one, so readers scoring an older one are never disturbed. The
    vocabulary dict is shared along the chain and only grows; a reader ignores ids past its own `starts`.
    """

    vocab: dict[str, int]
    starts: npt.NDArray[np.int64]
    rows: Rows
    counts: npt.NDArray[np.float32]
    lengths: npt.NDArray[np.float32]

    @classmethod
    def build(cls, texts: Iterable[str]) -> Lexicon:
        return cls.empty().extend(texts)

    @classmethod
    def empty(cls) -> Lexicon:
        return cls({}, np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float32),
                   np.zeros(0, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def nbytes(self) -> int:
        """About what it holds in memory: the arrays, and ~100 bytes a word for the vocabulary dict."""
        arrays = self.starts.nbytes + self.rows.nbytes + self.counts.nbytes + self.lengths.nbytes
        return arrays + 100 * (len(self.starts) - 1)

    def extend(self, texts: Iterable[str]) -> Lexicon:
        """A lexicon with `texts` as new rows after the existing ones."""
        vocab = self.vocab
        word_ids: list[int] = []
        lengths: list[int] = []
        for text in texts:
            words = terms(text)
            lengths.append(len(words))
            word_ids.extend([vocab.setdefault(word, len(vocab)) for word in words])
        if not lengths:
            return self
        first = len(self.lengths)
        rows = np.repeat(np.arange(first, first + len(lengths), dtype=np.int64), lengths)
        # One posting per (word, row), sorted by word then row, with how often the word is in the row.
        keys, counts = np.unique(np.array(word_ids, dtype=np.int64) * (first + len(lengths)) + rows,
                                 return_counts=True)
        new_ids, new_rows = np.divmod(keys, first + len(lengths))
        # Where each new posting goes among the old ones: after every old posting of the same word.
        size = len(vocab)
        old_starts = np.concatenate([self.starts, np.full(size + 1 - len(self.starts), self.starts[-1])])
        at = old_starts[new_ids + 1]
        merged_rows = np.insert(self.rows, at, new_rows.astype(np.int32))
        merged_counts = np.insert(self.counts, at, counts.astype(np.float32))
        starts = old_starts + np.searchsorted(new_ids, np.arange(size + 1), side="left")
        return Lexicon(vocab, starts, merged_rows, merged_counts,
                       np.concatenate([self.lengths, np.array(lengths, dtype=np.float32)]))

    def keep(self, kept: Mask) -> Lexicon:
        """The lexicon of the rows where `kept` is true, renumbered in order (a compaction of the matrix)."""
        renumber = np.cumsum(kept, dtype=np.int64) - 1
        live = kept[self.rows]
        word_of = np.repeat(np.arange(len(self.starts) - 1), np.diff(self.starts))[live]
        starts = np.searchsorted(word_of, np.arange(len(self.starts)), side="left").astype(np.int64)
        return Lexicon(self.vocab, starts, renumber[self.rows[live]].astype(np.int32), self.counts[live],
                       self.lengths[kept])

    def postings(self, word: str) -> tuple[Rows, npt.NDArray[np.float32]] | None:
        word_id = self.vocab.get(word)
        if word_id is None or word_id + 1 >= len(self.starts):
            return None
        start, end = self.starts[word_id], self.starts[word_id + 1]
        return self.rows[start:end], self.counts[start:end]

    def scores(self, query: Sequence[str], alive: Mask, fusion: Fusion) -> Scores:
        """Per row, the share (0 to < 1) of the query's searchable weight the row holds: BM25 over the `alive`
        rows (their count and mean length are the statistics), divided by the sum of idf * (k1 + 1)."""
        total = np.zeros(len(self.lengths), dtype=np.float64)
        documents = int(np.count_nonzero(alive))
        if not documents or not query:
            return total
        average = float(self.lengths[alive].mean()) or 1.0
        ceiling = 0.0
        common = max(fusion.common_share * documents, fusion.common_floor)
        for word in dict.fromkeys(query):
            found = self.postings(word)
            rows, counts = found if found is not None else (self.rows[:0], self.counts[:0])
            live = alive[rows]
            frequency = int(np.count_nonzero(live))
            if frequency > common:
                continue
            # A word none of the memories holds still counts in the ceiling: it is part of what was asked.
            idf = max(math.log((documents - frequency + 0.5) / (frequency + 0.5)), FLOOR_IDF)
            ceiling += idf * (K1 + 1)
            if frequency:
                rows, counts = rows[live], counts[live]
                norm = K1 * (1 - B + B * self.lengths[rows] / average)
                total[rows] += idf * counts * (K1 + 1) / (counts + norm)
        return total / ceiling if ceiling else total


def fuse(dense: Scores, lexical: Scores, fusion: Fusion) -> Scores:
    """One score per row: dense_weight * cosine + lexical_weight * matched share. Rows the dense side marks
    -inf (expired, replaced) stay -inf; with dense_weight 0 only rows some searched word reaches are eligible."""
    if fusion.dense_weight == 0:
        return np.where(np.isfinite(dense) & (lexical > 0), lexical * fusion.lexical_weight, -np.inf)
    fused: Scores = fusion.dense_weight * dense.astype(np.float64)
    if fusion.lexical:
        fused = fused + fusion.lexical_weight * lexical
    return fused


def hybrid(dense: Scores, query: str, lexicon: Lexicon | None, fusion: Fusion) -> Scores:
    """The fused scores of a user's rows: `dense` is the cosine per row (-inf: not eligible); the words searched
    are the question's own (a Question's `before` is in `dense` already, through the vector)."""
    if not fusion.lexical or lexicon is None:
        return fuse(dense, np.zeros(len(dense)), fusion)
    return fuse(dense, lexicon.scores(terms(query), np.isfinite(dense), fusion), fusion)


def reciprocal_rank(dense: Scores, lexical: Scores, k: int = 60) -> Scores:
    """Reciprocal-rank fusion (Cormack et al., 2009: sum of 1 / (k + rank) over the rankings a row is in), kept as
    the baseline `python -m bench.quality` measures the weighted score against."""
    fused = np.zeros(len(dense), dtype=np.float64)
    for scores in (dense, lexical):
        eligible = np.flatnonzero(np.isfinite(scores) & (scores > (0 if scores is lexical else -np.inf)))
        order = eligible[np.argsort(-scores[eligible], kind="stable")]
        fused[order] += 1.0 / (k + 1 + np.arange(len(order)))
    return np.where(np.isfinite(dense), fused, -np.inf)
