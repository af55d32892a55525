"""A free-text task for the tests and the distillation demo: name the city a sentence mentions.

`city_splits(n_train, n_test, seed)` renders `{"input": sentence, "output": city}` records from
sentence templates (deterministic for a seed; no download); the test split's templates are not the
training split's. `write_city_task(folder, ...)` writes them as train.jsonl and test.jsonl. The
answers are plain text: score them with `--scorer f1` or `contains`, keep teacher answers with
`--valid text`; `CITY_SYSTEM` is the system prompt that asks for the city alone.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = ["CITY_SYSTEM", "city_splits", "write_city_task"]

CITY_SYSTEM = "Reply with the name of the city mentioned in the message and nothing else."
CITIES = (
    "Paris", "London", "Berlin", "Madrid", "Rome", "Lisbon", "Vienna", "Prague", "Dublin", "Oslo",
    "Tokyo", "Seoul", "Cairo", "Lima", "Toronto", "Chicago", "Sydney", "Mumbai", "Nairobi", "Athens",
)  # fmt: skip
PEOPLE = ("My sister", "Our manager", "A friend of mine", "The new teacher", "My uncle", "Her cousin", "The doctor")
TRAIN_TEMPLATES = (
    "{who} moved to {city} last spring.",
    "{who} is flying to {city} tomorrow morning.",
    "We spent our holiday in {city} and loved the food.",
    "{who} grew up in {city}.",
    "The conference this year takes place in {city}.",
    "{who} just bought a flat in {city}.",
)
TEST_TEMPLATES = (
    "{who} works in an office in {city}.",
    "Next week the team travels to {city} for a meeting.",
)


def _render(templates: tuple[str, ...], n: int, rng: random.Random) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < n and len(seen) < len(templates) * len(CITIES) * len(PEOPLE):
        city = rng.choice(CITIES)
        text = rng.choice(templates).format(who=rng.choice(PEOPLE), city=city)
        if text not in seen:
            seen.add(text)
            rows.append({"input": text, "output": city})
    return rows


def city_splits(n_train: int, n_test: int, *, seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, test) records; the test sentences come from templates the training ones never use."""
    rng = random.Random(seed)
    return _render(TRAIN_TEMPLATES, n_train, rng), _render(TEST_TEMPLATES, n_test, rng)


def write_city_task(folder: Path, n_train: int, n_test: int, *, seed: int = 0) -> tuple[Path, Path]:
    """Write train.jsonl and test.jsonl into `folder`; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "test.jsonl"
    for path, rows in zip(paths, city_splits(n_train, n_test, seed=seed), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


if __name__ == "__main__":  # python -m slmops_testing.free_text_task FOLDER N_TRAIN N_TEST
    import sys

    print(*write_city_task(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
