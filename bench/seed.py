"""Distinct memories for benchmark users, seeded through the proxy's REST API (`POST /memories/{user}`).

Sentences combine six independent slots of 30 values each, picked at random from 729 million combinations, so
two memories almost never differ in a single slot: the store's near-duplicate merge keeps them all apart.
"""

from __future__ import annotations

import random
import time

import httpx

PEOPLE = ["My sister Ana", "My brother Tom", "My wife Priya", "My husband Karl", "My son Leo", "My daughter Mei",
          "My mother Rosa", "My father Ahmed", "My friend Jonas", "My colleague Fatima", "My boss Elena",
          "My neighbour Sven", "My cousin Ravi", "My aunt Olga", "My uncle Diego", "My grandmother Ines",
          "My landlord Marco", "My dentist Dr Silva", "My coach Kenji", "My flatmate Chloe", "My partner Sam",
          "My teacher Mrs Novak", "My niece Zoe", "My nephew Omar", "My best friend Lucia", "My manager Chen",
          "My doctor Ingrid", "My student Pablo", "My mentor Aisha", "My old roommate Viktor"]
ACTIVITIES = ["plays the cello", "restores vintage motorbikes", "bakes sourdough bread", "runs marathons",
              "collects rare stamps", "grows chilli peppers", "climbs indoor walls", "writes crime novels",
              "repairs mechanical watches", "keeps honey bees", "paints watercolour birds", "brews cider",
              "builds model railways", "practises judo", "sings in a gospel choir", "knits wool jumpers",
              "photographs old churches", "trains rescue dogs", "carves wooden spoons", "studies Mandarin",
              "sails small dinghies", "restores antique clocks", "plays chess online", "rides a unicycle",
              "roasts coffee beans", "translates Polish poetry", "fixes broken bicycles", "dances the tango",
              "teaches yoga", "forages wild mushrooms"]
PLACES = ["in Lisbon", "near Oslo", "in a garage in Lyon", "at a club in Leeds", "in Kyoto", "by a lake in Bled",
          "in a loft in Brooklyn", "outside Nairobi", "in central Krakow", "on a farm in Iowa", "in Valparaiso",
          "in the hills above Nice", "in a shed in Cork", "downtown in Austin", "in Tallinn old town",
          "on the coast of Cornwall", "in a studio in Seoul", "near the port of Hamburg", "in Melbourne",
          "in a village near Porto", "in Montreal", "at a community centre in Ghent", "in Reykjavik",
          "in Cape Town", "in Edinburgh", "on an island near Split", "in Bangalore", "in Quito",
          "in a barn in Vermont", "in Marrakesh"]
TIMES = ["every Sunday morning", "on Tuesday evenings", "twice a month", "during the summer holidays",
         "before work", "late at night", "on rainy afternoons", "each spring", "at weekends",
         "on public holidays", "every other Friday", "in the winter months", "after school", "at dawn",
         "on long weekends", "every Wednesday", "during lunch breaks", "when the weather is good",
         "each autumn", "on the first Saturday of the month", "most evenings", "on Thursday nights",
         "three times a week", "around Christmas", "every morning", "on Monday afternoons", "during Ramadan",
         "in August", "each New Year", "on sunny days"]
REASONS = ["to relax", "to stay fit", "because it reminds them of childhood", "to earn extra money",
           "to meet new people", "for a charity", "to prepare for a competition", "because a doctor suggested it",
           "to learn patience", "as a family tradition", "to escape the city", "to impress a friend",
           "because it is cheap", "to practise a language", "for their mental health", "to build a portfolio",
           "because their partner loves it", "to clear their head", "as a challenge", "to teach the kids",
           "to get outdoors", "for fun", "for a podcast", "to support a local club", "to beat an old record",
           "because it is quiet", "to keep a promise", "after losing a bet", "to save for a trip",
           "since retiring"]
SINCE = ["since 2009", "for two years", "since the pandemic", "for over a decade", "since university",
         "since last March", "for six months", "since moving house", "since 2015", "for most of their life",
         "since high school", "for about a year", "since their wedding", "for eight years", "since 2021",
         "since childhood", "for three summers", "since changing jobs", "since 2018", "for a few weeks",
         "since their divorce", "for twenty years", "since the kids left home", "for nearly five years",
         "since 2012", "since their first trip abroad", "for a long time", "since January", "since 2003",
         "for half a decade"]
SLOTS = [PEOPLE, ACTIVITIES, PLACES, TIMES, REASONS, SINCE]


def sentences(n: int, seed: int = 7) -> list[str]:
    """`n` distinct memory sentences, the same for the same seed."""
    rng = random.Random(seed)
    picked: set[tuple[int, ...]] = set()
    while len(picked) < n:
        picked.add(tuple(rng.randrange(len(slot)) for slot in SLOTS))
    out = []
    for who, what, where, when, why, since in sorted(picked):
        out.append(f"{PEOPLE[who]} {ACTIVITIES[what]} {PLACES[where]} {TIMES[when]} {REASONS[why]}, "
                   f"{SINCE[since]}.")
    return out


def question(i: int) -> str:
    """A question about the kind of thing the memories say, different every time (no cache can answer it)."""
    person = PEOPLE[i % len(PEOPLE)].removeprefix("My ")
    return f"What does my {person.split()[0]} do {TIMES[i % len(TIMES)]}? I need it for note {i}."


def seed(root: str, user: str, n: int, batch: int = 500) -> tuple[int, float]:
    """POST `n` memories for `user` in batches; returns (memories stored, seconds taken)."""
    stored: set[str] = set()
    start = time.perf_counter()
    texts = sentences(n)
    with httpx.Client(timeout=600) as client:
        for at in range(0, n, batch):
            response = client.post(f"{root}/memories/{user}", json=[{"text": t} for t in texts[at:at + batch]])
            response.raise_for_status()
            stored.update(m["id"] for m in response.json()["data"])
    return len(stored), time.perf_counter() - start
