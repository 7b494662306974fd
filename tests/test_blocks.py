"""The block filter: a real block never reaches the client, and text that only looks like one always does.

Answers are built from labelled atoms (every character known to be shown or not), so expected results come from
how each answer was made, not from the code under test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import combinations, pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.blocks import BlockFilter, strip_blocks
from proxy.fences import MAX_SPACE

MARK = "§"  # appears in every block body and nowhere else: one leaked character is enough to fail


def split(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in pairwise(bounds)]


def run(pieces: list[str], max_block: int = 64 * 1024) -> tuple[str, BlockFilter]:
    blocks = BlockFilter(max_block)
    shown = "".join(blocks.feed(piece) for piece in pieces)
    return shown + blocks.flush(), blocks


# --- answers built with a label for every character ------------------------------------------------------------

@dataclass
class Answer:
    text: str = ""
    shown: list[bool] = field(default_factory=list)  # per character of `text`
    blocks: list[str] = field(default_factory=list)
    unclosed: bool = False

    @property
    def visible(self) -> str:
        return "".join(c for c, shown in zip(self.text, self.shown, strict=True) if shown)

    def show(self, text: str) -> None:
        self.text += text
        self.shown += [True] * len(text)

    def hide(self, prefix: str, body: str, rest: str) -> None:
        """A block: `prefix` (whitespace, fence) + tag... as written; whitespace shown right before it goes too."""
        i = len(self.text)
        while i > 0 and self.shown[i - 1] and self.text[i - 1].isspace():
            self.shown[i - 1] = False
            i -= 1
        hidden = prefix + body + rest
        self.text += hidden
        self.shown += [False] * len(hidden)
        self.blocks.append(body)


# Prose, markup and code that look like a block and are not one. None ends with an unfinished tag, and code
# fences come in pairs and start on a line of their own, as in a real answer.
LOOK_ALIKES = [
    "a < b", "<memo>", "<memoryx>", "<b>", "x<y", "</memory>", "< memory x>", "<memory/>", "<\nmemory>",
    "<memory unit='KiB'>2097152</memory>", "<memory>2097152</memory>", "the `<memory>` element", "`<memory>[1]`",
    "<memory> is the tag", "Array<memory>[] = xs;", "<memory>[1] and more", "<memory>\n- likes tea\n</memory>",
    "<memory>{\"text\": \"x\"} said", "if a<b and c>d", "<<>", "<mem!", "<memories>", '{"text": "not a block"}',
    "[1, 2]", "\n```xml\n<domain>\n  <memory>[1]</memory>\n  <memory unit='KiB'>2</memory>\n</domain>\n```\n",
    "\n```ts\nconst xs = new Array<memory>[];\n```\n", "\n```\nplain code\n```\n", "<Memory>:", "<memory >`x`",
    # Closed like a block, but what they hold is no memory payload (reported from outside):
    "The tag looks like <memory>[ ... ]</memory> in the docs.", "Array literal: <memory>[1, 2, 3]</memory> is how",
    '{"a": "<memory>[1]</memory>"}', "<memory>{name}</memory>", "<memory>{}</memory>", "<memory>[1.5, null]</memory>",
    "<memory>[[1], {\"a\": 2}]</memory>", "<memory>{\"note\": \"x\"}</memory>",
]
plain = st.text(st.characters(blacklist_characters="<`[{" + MARK, blacklist_categories=("Cs",)), max_size=12)
spaces = st.sampled_from([" ", "\n", "\n\n", "\t", "  ", " \n ", "\u00a0", "\u2003", "\r\n"])
visible_atoms = st.one_of(plain, spaces, st.sampled_from(LOOK_ALIKES), st.sampled_from(["😀", "é", "日本", "ü "]))
inside = st.one_of(plain, st.sampled_from(["</memory>", "<memory>", "\\", '"', "'", "```", "\n", "}", "]", MARK]))


@st.composite
def tags(draw: st.DrawFn, closing: bool = False) -> str:
    space = st.text(" \t", max_size=4)
    word = "".join(c.upper() if draw(st.booleans()) else c for c in "memory")
    return "<" + draw(space) + ("/" + draw(space) if closing else "") + word + draw(space) + ">"


@st.composite
def payloads(draw: st.DrawFn) -> str:
    """What models write between the tags: JSON lists or objects (one per line too), or Python literals; every
    one holds the mark inside a string."""
    texts = [MARK + "".join(draw(st.lists(inside, max_size=4))) for _ in range(draw(st.integers(1, 3)))]
    kind = draw(st.integers(0, 3))
    if kind == 0:
        items = [{"text": text, "category": "fact"} for text in texts] + [{"forget": "m1"}, {"ttl_seconds": 3600.5}]
        return json.dumps(items[:len(texts) + draw(st.integers(0, 2))], ensure_ascii=draw(st.booleans()))
    if kind == 1:
        return json.dumps({"memories": texts, "ok": True, "n": None})
    if kind == 2:
        return "\n".join(json.dumps({"text": text}) for text in texts)
    return repr([{"text": text} for text in texts])  # Python literal: single quotes, or double where needed


@st.composite
def answers(draw: st.DrawFn, max_parts: int = 8, blocks: bool = True) -> Answer:
    answer = Answer()
    for _ in range(draw(st.integers(0, max_parts))):
        if not blocks or draw(st.integers(0, 3)):
            answer.show(draw(visible_atoms))
            continue
        fenced = draw(st.booleans())
        prefix = draw(st.sampled_from(["\n", "\n\n", " \n"] if fenced else ["", " ", "\n", "\n\n", "  \n"]))
        if answer.text.endswith("`") and not prefix:
            prefix = " "
        if fenced:
            prefix += draw(st.sampled_from(["```json\n", "```\n", "```memory  \n"]))
        inner = draw(st.booleans())
        gap = draw(st.sampled_from(["", "\n", " "]))
        payload = draw(payloads())
        body = gap + ("```json\n" + payload + "\n```\n" if inner else payload + draw(st.sampled_from(["", "\n"])))
        if draw(st.integers(0, 5)) == 0:  # cut off at the end (max_tokens): taken out all the same
            body = gap + payload[:draw(st.integers(1, len(payload)))]
            answer.hide(prefix, draw(tags()) + body, "")
            answer.blocks[-1] = body
            answer.unclosed = True
            break
        close = draw(tags(closing=True)) + (draw(st.sampled_from(["\n```", " \n```"])) if fenced else "")
        answer.hide(prefix + draw(tags()), body, close)
        answer.blocks[-1] = body
    return answer


# --- properties ------------------------------------------------------------------------------------------------

@settings(max_examples=1500, deadline=None)
@given(answers(), st.data())
def test_any_split_gives_exactly_the_answer_without_its_blocks(answer: Answer, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(answer.text)), max_size=12))
    shown, blocks = run(split(answer.text, cuts))
    assert MARK not in shown
    assert shown == answer.visible
    assert blocks.blocks == answer.blocks and blocks.unclosed == answer.unclosed
    assert strip_blocks(answer.text) == (answer.visible, answer.blocks)


@settings(max_examples=1500, deadline=None)
@given(answers(blocks=False, max_parts=12), st.data())
def test_an_answer_without_a_real_block_comes_out_exactly_as_it_went_in(answer: Answer, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(answer.text)), max_size=12))
    shown, blocks = run(split(answer.text, cuts))
    assert shown == answer.text and blocks.blocks == []


@settings(max_examples=500, deadline=None)
@given(answers(), st.data())
def test_released_spans_point_at_what_was_sent(answer: Answer, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(answer.text)), max_size=6))
    blocks = BlockFilter()
    for piece in split(answer.text, cuts):
        sent = blocks.feed(piece)
        assert sent == "".join(answer.text[a:b] for a, b in blocks.released)
        assert 0 <= blocks.undecided <= blocks.consumed
    assert blocks.flush() == "".join(answer.text[a:b] for a, b in blocks.released)


@settings(max_examples=500, deadline=None)
@given(st.text(st.characters(blacklist_characters="<`", blacklist_categories=("Cs",)), max_size=80), st.data())
def test_text_that_cannot_start_a_block_goes_out_at_once(text: str, data: st.DataObject) -> None:
    """Without a `<` or a backtick nothing is held but a trailing run of whitespace (a block may follow it)."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=10)))
    blocks = BlockFilter()
    sent = ""
    for end, piece in zip([*cuts, len(text)], split(text, cuts), strict=True):
        sent += blocks.feed(piece)
        so_far = text[:end]
        held = len(so_far) - len(so_far.rstrip())
        assert sent == so_far[:len(so_far) - min(held, MAX_SPACE)] or sent == so_far[:len(so_far) - held]
        assert blocks.undecided <= MAX_SPACE
    assert sent + blocks.flush() == text


# --- the inputs that failed, split at every boundary and every pair of boundaries -------------------------------

CASES = [
    # libvirt XML in a code fence: text, every byte of it
    ("Here is the domain:\n```xml\n<domain type='kvm'>\n  <name>vm1</name>\n  <memory unit='KiB'>2097152</memory>\n"
     "  <vcpu>2</vcpu>\n</domain>\n```\nDone.", None, []),
    ("Set it with the `<memory>` element of the domain; the rest of this answer must stay.", None, []),
    ("The <memory> element takes a unit attribute, and everything after the tag stays visible.", None, []),
    ('Done. <memory>[{"text": "User writes XML with a </memory> closing tag"}]</memory>',
     "Done.", ['[{"text": "User writes XML with a </memory> closing tag"}]']),
    ('Sure!\n\n```json\n<memory>[{"text": "User likes tea"}]</memory>\n```', "Sure!", ['[{"text": "User likes tea"}]']),
    ('```python\nprint(1)\n```\n\n<memory>[{"text": "User codes in Python"}]</memory>',
     "```python\nprint(1)\n```", ['[{"text": "User codes in Python"}]']),
    ('{"elements": ["<domain>", "<name>", "<memory>", "<vcpu>"]}', None, []),
]


def test_the_inputs_of_the_issue_at_every_split() -> None:
    for text, visible, bodies in CASES:
        expected = (text if visible is None else visible, bodies)
        assert strip_blocks(text) == expected, text
        positions = range(len(text) + 1)
        for cuts in [*([i] for i in positions), *(list(pair) for pair in combinations(positions, 2))]:
            shown, blocks = run(split(text, cuts))
            assert (shown, blocks.blocks) == expected, (text, cuts)


def test_every_character_alone() -> None:
    text = ("Hi!  <memo> a<b\n\n< MEMORY >['§']</ memory >\tok `<memory>` <memory>x</memory> <memory>[1]</memory>"
            '<memory>[{"text": "§ unclosed </memo')
    shown, blocks = run(list(text))
    assert shown == "Hi!  <memo> a<b\tok `<memory>` <memory>x</memory> <memory>[1]</memory>"
    assert blocks.blocks == ["['§']", '[{"text": "§ unclosed </memo'] and blocks.unclosed


def test_text_is_shown_at_once_and_a_block_never() -> None:
    blocks = BlockFilter()
    assert blocks.feed("Hello") == "Hello"
    assert blocks.feed(" wor") == " wor"
    assert blocks.feed("ld ") == "ld"  # the space waits: a block may follow
    assert blocks.feed("<") == ""
    assert blocks.feed("b>") == " <b>"  # not a tag: out at once
    assert blocks.feed("\n<mem") == ""
    assert blocks.feed("ory>") == ""
    assert blocks.feed(" x") == "\n<memory> x"  # not a payload: out at once
    assert blocks.feed(" <memory>[") == ""
    assert blocks.feed('"§"]</memory>\nBye') == "\nBye"
    assert blocks.flush() == "" and blocks.blocks == ['["§"]'] and not blocks.unclosed


def test_a_fence_line_waits_only_for_the_next_character() -> None:
    blocks = BlockFilter()
    assert blocks.feed("Code:\n```py") == "Code:"
    assert blocks.feed("\n") == ""
    assert blocks.feed("x = 1\n") == "\n```py\nx = 1"  # (the newline waits: a block may follow it)


def test_a_block_longer_than_the_cap_is_text() -> None:
    body = '[{"text": "' + "x" * 500 + '"}]'
    text = "Hi <memory>" + body + "</memory> bye"
    assert strip_blocks(text, max_block=100) == (text, [])
    blocks = BlockFilter(max_block=100)
    shown = "".join(blocks.feed(c) for c in text)
    assert blocks.undecided <= 100 + 20  # never more than the cap (plus the tag) held
    assert shown + blocks.flush() == text
    assert strip_blocks(text, max_block=1000) == ("Hi bye", [body])


def test_held_whitespace_is_bounded_whatever_the_run() -> None:
    """A model stuck printing newlines: the held run stays at MAX_SPACE, so each delta costs the same."""
    blocks = BlockFilter()
    shown = []
    for _ in range(20_000):
        shown.append(blocks.feed("\n"))
        assert blocks.undecided <= MAX_SPACE
    assert "".join(shown) + blocks.flush() == "\n" * 20_000


def test_an_unclosed_candidate_that_is_prose_is_shown() -> None:
    assert strip_blocks("see <memory>[x] for more") == ("see <memory>[x] for more", [])
    assert strip_blocks("cut <memory>\n") == ("cut <memory>\n", [])
    assert strip_blocks('cut <memory>[{"text": "a') == ("cut", ['[{"text": "a'])


@settings(max_examples=500, deadline=None)
@given(answers(), st.data())
def test_a_stream_broken_anywhere_shows_no_part_of_a_block(answer: Answer, data: st.DataObject) -> None:
    end = data.draw(st.integers(0, len(answer.text)))
    blocks = BlockFilter()
    shown = blocks.feed(answer.text[:end]) + blocks.flush(broken=True)
    assert MARK not in shown
    assert blocks.blocks == answer.blocks[:len(blocks.blocks)]  # only blocks closed before the break are kept
    assert not blocks.unclosed


def test_a_broken_stream_shows_what_was_held_that_is_no_block() -> None:
    for pieces, expected in ((["Hello ", "<mem"], "Hello <mem"), (["Hi", " \n "], "Hi \n "),
                             (["Hi <memory>", "["], "Hi"), (["a\n```json\n"], "a\n```json\n")):
        blocks = BlockFilter()
        shown = "".join(blocks.feed(piece) for piece in pieces)
        assert shown + blocks.flush(broken=True) == expected
        assert blocks.blocks == []
