"""Write the demo's sentence sets: short reviews labelled with a topic and a sentiment.

The test split uses adjectives the training split never shows (HELD_OUT), so it measures whether an
adapter learned sentiment rather than a word list. Deterministic (fixed seed), so the committed JSONL
files are reproducible:
    python examples/data/make_data.py
Each line: {"text": ..., "topic": one of TOPICS, "sentiment": "positive"|"negative", "label": "<topic>/<sentiment>"}
("label" is what `zoo compose --fusion attention --train` learns: neighbours that share topic AND sentiment).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = {
    "sports": ["match", "game", "team", "final", "race", "season", "coach", "stadium"],
    "food": ["pasta", "soup", "restaurant", "dessert", "pizza", "menu", "breakfast", "curry"],
    "tech": ["laptop", "phone", "update", "app", "keyboard", "battery", "camera", "software"],
    "travel": ["hotel", "flight", "beach", "trip", "train ride", "museum", "tour", "city"],
}
POSITIVE = ["wonderful", "excellent", "fantastic", "delightful", "superb", "great", "lovely", "brilliant"]
NEGATIVE = ["terrible", "awful", "dreadful", "disappointing", "horrible", "poor", "miserable", "bad"]
HELD_OUT = {"superb", "lovely", "miserable", "poor"}
TEMPLATES = [
    "The {noun} was {adj}.",
    "What a {adj} {noun}, honestly.",
    "I found the {noun} {adj} from start to finish.",
    "Everyone agreed the {noun} was {adj}.",
    "Our {noun} last week was {adj}.",
    "Honestly, a {adj} {noun}.",
    "This {noun} turned out {adj}.",
    "My friends said the {noun} felt {adj}.",
]


def sentences(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for topic, nouns in TOPICS.items():
        for sentiment, adjectives in (("positive", POSITIVE), ("negative", NEGATIVE)):
            for noun in nouns:
                for template, adj in zip(rng.sample(TEMPLATES, 4), rng.sample(adjectives, 4)):
                    text = template.format(noun=noun, adj=adj)
                    rows.append({"text": text[0].upper() + text[1:], "topic": topic, "sentiment": sentiment, "label": f"{topic}/{sentiment}", "held_out": adj in HELD_OUT})
    rng.shuffle(rows)
    return rows


def main() -> None:
    rows = sentences()
    here = Path(__file__).parent
    for name, held_out in (("train", False), ("test", True)):
        part = [{k: v for k, v in r.items() if k != "held_out"} for r in rows if r["held_out"] == held_out]
        with open(here / f"reviews-{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
        print(f"wrote {len(part)} rows to {here / f'reviews-{name}.jsonl'}")


if __name__ == "__main__":
    main()
