"""The evaluation set of `python -m bench.quality`, written for this project (licence: the project's).

    python -m bench.qualityset            writes bench/data/quality.jsonl (deterministic: same seed, same file)

Synthetic users in four languages, each with about 120 memories told in their own language: personal facts,
restatements of some of them (near-duplicates), facts later replaced ("I have just moved to Oslo" supersedes "I
live in Lisbon"), dated events, the same kinds of facts about other people (distractors that share the words),
and filler about friends and colleagues. Questions: the fact's own words ("keyword"), other words ("paraphrase"),
about a fact that was replaced ("superseded": the old one must never come back as current), when something
happened ("when"), what happened in a month ("month"), two facts at once ("two"), a question in another
language than the facts ("crosslingual"), and a follow-up that only makes sense after the turn before it
("followup": "And my sister?"). Every question comes with the turn before it (`context`: the user's previous
message and the assistant's reply), most often about another topic.

One JSON object per user per line: {"user", "lang", "memories": [{"key", "text", "category", "replaces",
"happened_at"}], "questions": [{"text", "lang", "kind", "gold": [[key, ...], ...], "superseded": [key, ...],
"context": [message, ...]}]}.
`gold` is a list of groups: a group is found when any of its keys is (a fact and its restatement are one group).
"""

from __future__ import annotations

import random
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson

from bench.qualityset import lang_de, lang_en, lang_es, lang_fr

LANGS: dict[str, ModuleType] = {"en": lang_en, "es": lang_es, "de": lang_de, "fr": lang_fr}
PATH = Path(__file__).resolve().parent.parent / "data" / "quality.jsonl"
USERS_PER_LANG = 6
MEMORIES = 120
NAMES = ["Ana", "Tomás", "Priya", "Karl", "Leo", "Mei", "Rosa", "Ahmed", "Fatima", "Sven", "Olga", "Inés",
         "Marco", "Chen", "Aisha", "Pablo", "Ingrid", "Omar", "Lucía", "Noah", "Yuki", "Emma", "Jakob", "Camille"]
PROFILE = {"language", "allergy"}  # always-injected kinds (category "profile")
CATEGORY = {"drink": "preference", "cuisine": "preference", "sport": "preference", "commute": "context"}


class User:
    """One synthetic user's memories and questions, built from a language module and a seeded generator."""

    def __init__(self, name: str, lang: str, rng: random.Random) -> None:
        self.name, self.lang, self.rng = name, lang, rng
        self.t = LANGS[lang]
        self.memories: list[dict[str, Any]] = []
        self.questions: list[dict[str, Any]] = []

    def slots(self, template: str, **fixed: Any) -> dict[str, Any]:
        """Random values for the slots a template names, as indexes into VALUES (aligned across languages)."""
        picked = dict(fixed)
        for key in self.t.VALUES:
            if "{" + key + "}" in template and key not in picked:
                picked[key] = self.rng.randrange(len(self.t.VALUES[key]))
        return picked

    def fill(self, template: str, picked: dict[str, Any], lang: str | None = None) -> str:
        module = LANGS[lang or self.lang]
        words = {key: module.VALUES[key][index] if key in module.VALUES else index for key, index in picked.items()}
        if "who" in picked:  # "my colleague Tom": a capital only where it starts the sentence
            words["who"] = module.WHO[picked["who"]][0].lower() + module.WHO[picked["who"]][1:]
        text = template.format(**words)
        return text[0].upper() + text[1:]

    def remember(self, text: str, category: str = "fact", replaces: str | None = None,
                 happened_at: str | None = None) -> str:
        key = f"{self.name}-m{len(self.memories) + 1:03d}"
        self.memories.append({"key": key, "text": text, "category": category, "replaces": replaces,
                              "happened_at": happened_at})
        return key

    def ask(self, text: str, kind: str, gold: list[list[str]], superseded: list[str] | None = None,
            lang: str | None = None, before: str | None = None) -> None:
        context = [] if before is None else [{"role": "user", "content": before},
                                             {"role": "assistant", "content": self.t.REPLY}]
        self.questions.append({"text": text, "lang": lang or self.lang, "kind": kind, "gold": gold,
                               "superseded": superseded or [], "context": context})

    def build(self) -> dict[str, Any]:
        rng, t = self.rng, self.t
        kinds = list(t.FACTS)
        rng.shuffle(kinds)
        groups: dict[str, list[str]] = {}
        picks: dict[str, dict[str, Any]] = {}
        for kind in kinds:
            fact = t.FACTS[kind]
            picks[kind] = self.slots(fact["fact"] + fact["again"], name=rng.choice(NAMES), day=rng.randint(1, 28),
                                     month=rng.randrange(12))
            category = "profile" if kind in PROFILE else CATEGORY.get(kind, "fact")
            groups[kind] = [self.remember(self.fill(fact["fact"], picks[kind]), category)]
        updatable = [kind for kind in kinds if "update" in t.FACTS[kind]]
        updated = updatable[:3]
        for kind in [k for k in kinds if k not in updated][:4]:  # restatements: the same fact, other words
            groups[kind].append(self.remember(self.fill(t.FACTS[kind]["again"], picks[kind]), "fact"))
        for kind in kinds:  # the same kind of fact about other people, sharing the words
            for _ in range(2):
                other = t.FACTS[kind]["other"]
                self.remember(self.fill(other, self.slots(other, who=rng.randrange(len(t.WHO)), name=rng.choice(NAMES),
                                                          day=rng.randint(1, 28), month=rng.randrange(12))))
        events = self.events()
        self.fillers(MEMORIES - len(self.memories) - len(updated))
        replaced = {}
        for kind in updated:  # told last: these replace what was said first
            old = picks[kind]
            new = self.slots(t.FACTS[kind]["update"])
            key = next(k for k in t.VALUES if "{" + k + "}" in t.FACTS[kind]["update"])
            while new[key] == old.get(key):
                new[key] = rng.randrange(len(t.VALUES[key]))
            replaced[kind] = groups[kind][0]
            groups[kind] = [self.remember(self.fill(t.FACTS[kind]["update"], new), "fact", replaces=replaced[kind])]
        self.questions_about(kinds, groups, replaced, events)
        return {"user": self.name, "lang": self.lang, "memories": self.memories, "questions": self.questions}

    def events(self) -> list[tuple[str, int, int, str]]:
        """Six dated events of the user (distinct months), four dated distractors; (key, month, year, when-question)."""
        rng, t = self.rng, self.t
        chosen = rng.sample(range(len(t.EVENTS)), 6)
        months = rng.sample([(m, y) for y in range(2019, 2025) for m in range(12)], 10)
        out = []
        for index, (month, year) in zip(chosen, months, strict=False):
            day = rng.randint(1, 28)
            event = t.EVENTS[index][0].format(city=t.VALUES["city"][rng.randrange(len(t.VALUES["city"]))])
            text = self.fill(t.EVENT, {"day": day, "month": month, "year": year, "event": event})
            out.append((self.remember(text, "event", happened_at=f"{year}-{month + 1:02d}-{day:02d}"), month, year,
                        t.EVENTS[index][1]))
        for month, year in months[6:]:
            self.remember(self.fill(t.EVENT_OTHER, {"day": rng.randint(1, 28), "month": month, "year": year,
                                                    "who": rng.randrange(len(t.WHO))}))
        return out

    def fillers(self, count: int) -> None:
        t, seen = self.t, set()
        while len(seen) < count:
            parts = (self.rng.randrange(len(t.PEOPLE)), self.rng.randrange(len(t.ACTIVITIES)),
                     self.rng.randrange(len(t.PLACES)), self.rng.randrange(len(t.TIMES)))
            if parts not in seen:
                seen.add(parts)
                self.remember(t.FILLER.format(person=t.PEOPLE[parts[0]], activity=t.ACTIVITIES[parts[1]],
                                              place=t.PLACES[parts[2]], time=t.TIMES[parts[3]]))

    def questions_about(self, kinds: list[str], groups: dict[str, list[str]], replaced: dict[str, str],
                        events: list[tuple[str, int, int, str]]) -> None:
        rng, t = self.rng, self.t
        plain = [kind for kind in kinds if kind not in replaced]
        for n, kind in enumerate(plain[:13]):
            style = "ask" if n < 8 else "para"
            self.ask(t.FACTS[kind][style], "keyword" if style == "ask" else "paraphrase", [groups[kind]])
        for kind, old in replaced.items():
            self.ask(t.FACTS[kind][rng.choice(["ask", "para"])], "superseded", [groups[kind]], [old])
        for key, _, _, question in events[:2]:
            self.ask(question, "when", [[key]])
        for key, month, year, _ in events[2:4]:
            self.ask(self.fill(t.WHEN, {"month": month, "year": year}), "month", [[key]])
        first, second = plain[-2:]
        self.ask(t.AND.format(first=t.FACTS[first]["ask"], second=t.FACTS[second]["ask"]), "two",
                 [groups[first], groups[second]])
        other = "es" if self.lang == "en" else "en"
        for kind in plain[8:10]:
            self.ask(LANGS[other].FACTS[kind]["ask"], "crosslingual", [groups[kind]], lang=other)
        # The turn before each question: most often another topic, which the question must not be mixed up with.
        for question in self.questions:
            before = rng.choice([q["text"] for q in self.questions if q is not question and q["lang"] == self.lang])
            question["context"] = [{"role": "user", "content": before}, {"role": "assistant", "content": t.REPLY}]
        # Follow-ups: the question only makes sense after the one before it.
        candidates = [f for f in t.FOLLOWUPS if f[0] in plain and f[2] in plain]
        for first, text, about in rng.sample(candidates, min(3, len(candidates))):
            self.ask(text, "followup", [groups[about]], before=t.FACTS[first]["ask"])


SEED = 18  # the shipped set's (bench/data/quality.jsonl); bench.quality --seed N makes others to check against


def generate(seed: int = SEED) -> list[dict[str, Any]]:
    """Every user of the set, the same for the same seed."""
    rng = random.Random(seed)
    users = []
    for lang in LANGS:
        for n in range(USERS_PER_LANG):
            users.append(User(f"{lang}{n + 1:02d}", lang, random.Random(rng.random())).build())
    return users


def load(path: Path = PATH) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def main() -> None:
    users = generate()
    PATH.parent.mkdir(parents=True, exist_ok=True)
    PATH.write_bytes(b"".join(orjson.dumps(user) + b"\n" for user in users))
    memories = sum(len(u["memories"]) for u in users)
    questions = sum(len(u["questions"]) for u in users)
    print(f"{PATH}: {len(users)} users, {memories} memories, {questions} questions")


if __name__ == "__main__":
    main()
