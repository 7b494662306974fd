"""Precision and recall of the secret detector on the labelled corpus (bench/secrets_corpus.py), side by side:

    ours             proxy/sensitive.py `secret_kind`: normalised text, detect-secrets' plugins + our own rules
    detect-secrets   the library alone: every plugin but the entropy and public-IP ones, its keyword plugin
                     reading the text as a config file (`password: x`), on the text as given
    old rules        the patterns the proxy used before issue 17 (kept here verbatim as the baseline)

    python -m bench.secrets [--show] [--repeat N]

Per-text cost is the mean over the corpus (each detector run `--repeat` times, interleaved), in microseconds.
`--show` lists every text a detector gets wrong.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections.abc import Callable

from bench.secrets_corpus import Example, corpus
from proxy import sensitive

# --- the rules before issue 17, verbatim -------------------------------------------------------------------------
OLD_TOKEN_PATTERNS = [
    r"\bsk-(?:proj-|ant-|or-)?[A-Za-z0-9_\-]{16,}",
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    r"\bgh[pousr]_[A-Za-z0-9]{30,}",
    r"\bgithub_pat_[A-Za-z0-9_]{30,}",
    r"\bxox[abprs]-[A-Za-z0-9\-]{10,}",
    r"\bAIza[0-9A-Za-z_\-]{35}\b",
    r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}",
    r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}",
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    r"\b[Bb]earer\s+[A-Za-z0-9_\-\.=]{20,}",
]
OLD_PASSWORD = re.compile(
    r"\b(?:password|passwd|passcode|passphrase|pin|mot de passe|contraseña|senha|passwort|kennwort)\b"
    r"\s*(?:is|was|=|:|est|es|é|ist)\s*\S+", re.IGNORECASE)
OLD_TOKENS = re.compile("|".join(OLD_TOKEN_PATTERNS))
OLD_CARD = re.compile(r"\b(?:\d[ -]?){13,19}\b")


def old_rules(text: str) -> bool:
    if OLD_TOKENS.search(text):
        return True
    for match in OLD_CARD.finditer(text):
        digits = re.sub(r"\D", "", match.group())
        if 13 <= len(digits) <= 19 and sensitive.luhn_valid(digits):
            return True
    return bool(OLD_PASSWORD.search(text))


DETECTORS: dict[str, Callable[[str], bool]] = {
    "ours (detect-secrets + own rules, normalised)": lambda text: sensitive.secret_kind(text) is not None,
    "detect-secrets 1.5 alone": lambda text: sensitive.library_finds(text, keyword=True),
    "old rules (before issue 17)": old_rules,
}


def measure(examples: list[Example], repeat: int) -> dict[str, tuple[list[bool], float]]:
    for detect in DETECTORS.values():  # warm up: imports, compiled patterns
        detect("warm up")
    verdicts: dict[str, list[bool]] = {name: [] for name in DETECTORS}
    seconds: dict[str, float] = dict.fromkeys(DETECTORS, 0.0)
    for example in examples:
        for name, detect in DETECTORS.items():  # interleaved, so that machine drift hits each alike
            start = time.perf_counter()
            for _ in range(repeat):
                verdict = detect(example.text)
            seconds[name] += time.perf_counter() - start
            verdicts[name].append(verdict)
    return {name: (verdicts[name], seconds[name] / repeat / len(examples) * 1e6) for name in DETECTORS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--show", action="store_true", help="list the texts each detector gets wrong")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    examples = corpus()
    secrets = sum(e.secret for e in examples)
    sets = [kind for kind in dict.fromkeys(e.kind for e in examples) if kind.endswith(" set")]
    print(f"corpus: {secrets} secrets, {len(examples) - secrets} harmless facts (bench/secrets_corpus.py); "
          + ", ".join(f"{sum(e.kind == kind for e in examples)} in the {kind}" for kind in sets)
          + " (written after tuning; their first, blind runs: recall 0.750 and 0.733, 0.0% harmless refused; "
            "see held_out and blind_set)\n")
    results = measure(examples, max(1, args.repeat))
    kinds = sorted({e.kind for e in examples if e.secret and e.kind not in sets})
    print("| detector | precision | recall | harmless refused | " + " | ".join(f"recall: {k}" for k in kinds)
          + "".join(f" | {kind}: recall | {kind}: harmless refused" for kind in sets) + " | µs per text |")
    print("|---|---|---|---|" + "---|" * len(kinds) + "---|---|" * len(sets) + "---|")
    for name, (verdicts, micros) in results.items():
        pairs = list(zip(verdicts, examples, strict=True))
        tp = sum(v and e.secret for v, e in pairs)
        fp = sum(v and not e.secret for v, e in pairs)
        precision = tp / (tp + fp) if tp + fp else 1.0
        per_kind = [f"{statistics.fmean(v for v, e in pairs if e.kind == kind):.3f}" for kind in kinds]
        per_set = []
        for kind in sets:
            recall = statistics.fmean(v for v, e in pairs if e.kind == kind and e.secret)
            refused = statistics.fmean(v for v, e in pairs if e.kind == kind and not e.secret)
            per_set.append(f"{recall:.3f} | {refused:.1%}")
        print(f"| {name} | {precision:.3f} | {tp / secrets:.3f} | {fp / (len(examples) - secrets):.1%} | "
              + " | ".join(per_kind + per_set) + f" | {micros:.0f} |")
    if args.show:
        for name, (verdicts, _) in results.items():
            print(f"\n{name}:")
            for verdict, example in zip(verdicts, examples, strict=True):
                if verdict != example.secret:
                    print(f"  {'missed' if example.secret else 'refused'} [{example.kind}] {example.text!r}")


if __name__ == "__main__":
    main()
