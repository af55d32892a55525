"""The edge task and its data: smart-home commands in plain language -> one JSON action.

`generate_splits(n_train, n_val, n_test, seed)` renders examples from templates; every template
(command phrasing and delay phrasing alike) belongs to exactly one split, so the test split measures
phrasings the model never saw. Every intent has phrasings in every split. The output schema:

    {"action": "on"|"off"|"set"|"open"|"close"|"lock"|"unlock", "device": DEVICE, "room": ROOM,
     "level": 0-100 (set brightness, speed, volume, position), "temperature": 10-30 (set thermostat),
     "delay_s": seconds (only when the command is delayed)}
    {"action": "none"}         a question, small talk, or an explicit "don't"
    {"action": "unsupported"}  a request for a device or service the home does not have

Keys appear in that order and only when they apply (`actions.target_text`, the one canonical
text; `actions.score` scores answers). The examples are `examples.Example`s.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from slmops_builder.train.actions import SYSTEM_PROMPT, target_text
from slmops_builder.train.examples import Example

__all__ = ["SPLITS", "TaskSplits", "action_schema", "generate_splits", "number_words"]

SPLITS = ("train", "validation", "test")

# canonical device -> (words for it, its adjustable quantity or None)
DEVICES: dict[str, tuple[tuple[str, ...], str | None]] = {
    "light": (("light", "lights", "lamp", "lamps", "lighting"), "level"),
    "fan": (("fan", "ceiling fan", "fans"), "level"),
    "speaker": (("speaker", "music", "sound system"), "level"),
    "blinds": (("blinds", "shades", "curtains"), "level"),
    "tv": (("tv", "television", "telly"), None),
    "heater": (("heater", "radiator", "space heater"), None),
    "thermostat": (("thermostat", "heating", "temperature"), "temperature"),
    "lock": (("door lock", "front door", "lock"), None),
}
SWITCHABLE = ("light", "fan", "speaker", "tv", "heater")
LEVELED = ("light", "fan", "speaker", "blinds")
ROOMS: dict[str, tuple[str, ...]] = {
    "kitchen": ("kitchen",),
    "living room": ("living room", "lounge", "sitting room"),
    "bedroom": ("bedroom", "master bedroom"),
    "bathroom": ("bathroom", "bath"),
    "office": ("office", "study"),
    "garage": ("garage",),
    "hallway": ("hallway", "hall", "corridor"),
    "dining room": ("dining room",),
    "kids room": ("kids room", "nursery"),
}
UNSUPPORTED = (
    "dishwasher",
    "washing machine",
    "car",
    "oven",
    "coffee maker",
    "sprinklers",
    "vacuum",
    "garage door opener",
)
_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """0..100 in English words ("forty five", "one hundred")."""
    if n == 100:
        return "one hundred"
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + ("" if ones == 0 else f" {_ONES[ones]}")


# Command templates per intent. Slots: {device} {room} {level} {temp}. A template's id is
# "<intent>:<index>"; splits own disjoint sets of them.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "on": (
        "turn on the {room} {device}",
        "switch the {device} in the {room} on",
        "{room} {device} on please",
        "can you power up the {device} in the {room}",
        "I need the {device} on in the {room}",
        "please switch on the {device} in the {room}",
        "start the {room} {device}",
        "could you turn the {room} {device} on",
        "activate the {device} in the {room}",
        "hey, {device} on in the {room}",
    ),
    "off": (
        "turn off the {room} {device}",
        "switch the {device} in the {room} off",
        "{room} {device} off",
        "kill the {device} in the {room}",
        "please shut off the {room} {device}",
        "stop the {device} in the {room}",
        "could you turn the {device} off in the {room}",
        "power down the {room} {device}",
        "deactivate the {device} in the {room}",
        "I don't need the {room} {device} anymore, turn it off",
    ),
    "set": (
        "set the {room} {device} to {level}",
        "dim the {room} {device} to {level}",
        "put the {device} in the {room} at {level}",
        "change the {device} in the {room} to {level}",
        "adjust the {room} {device} to {level}",
        "{room} {device} at {level} please",
        "bring the {device} in the {room} to {level}",
        "can you make the {room} {device} {level}",
        "I want the {device} in the {room} at {level}",
        "move the {room} {device} to {level}",
    ),
    "temperature": (
        "set the {room} {device} to {temp} degrees",
        "make it {temp} degrees in the {room}",
        "heat the {room} to {temp} degrees",
        "I'd like the {room} at {temp} degrees",
        "change the {device} in the {room} to {temp}",
        "can you warm the {room} up to {temp} degrees",
        "cool the {room} down to {temp} degrees",
        "{room} {device} {temp} degrees please",
        "put the {room} {device} on {temp}",
        "keep the {room} at {temp} degrees",
    ),
    "open": (
        "open the {room} {device}",
        "raise the {device} in the {room}",
        "pull up the {room} {device}",
        "let some light in, open the {device} in the {room}",
        "could you open the {device} in the {room}",
        "roll up the {room} {device}",
    ),
    "close": (
        "close the {room} {device}",
        "lower the {device} in the {room}",
        "draw the {room} {device}",
        "shut the {device} in the {room}",
        "could you close the {room} {device}",
        "roll down the {device} in the {room}",
    ),
    "lock": (
        "lock the {device}",
        "make sure the {device} is locked",
        "please lock up the {device}",
        "secure the {device}",
        "can you lock the {device}",
        "{device}: lock it",
    ),
    "unlock": (
        "unlock the {device}",
        "release the {device}",
        "please unlock the {device}",
        "let me in, unlock the {device}",
        "can you unlock the {device}",
        "{device}: unlock it",
    ),
    "none": (
        "don't turn on the {room} {device}",
        "what's the weather like tomorrow",
        "is the {device} in the {room} on?",
        "never mind, leave the {room} {device} as it is",
        "thanks, that's all",
        "how warm is it in the {room}?",
        "do not touch the {device} in the {room}",
        "tell me a joke",
        "who turned off the {room} {device}?",
        "good morning!",
    ),
    "unsupported": (
        "turn on the {unsupported}",
        "start the {unsupported} in the {room}",
        "order a pizza",
        "switch off the {unsupported}",
        "call my mom",
        "run the {unsupported} in {delay_words}",
        "book a table for two tonight",
        "set the {unsupported} to {level}",
        "buy more milk",
        "can you fix the {unsupported}",
    ),
}
# Delay phrasings (slot {n} or fixed). Each maps a number of the unit to seconds.
DELAYS: tuple[tuple[str, int], ...] = (
    ("in {n} minutes", 60),
    ("in {n} min", 60),
    ("{n} minutes from now", 60),
    ("after {n} minutes", 60),
    ("in {n} seconds", 1),
    ("in {n} hours", 3600),
    ("in {n} hrs", 3600),
    ("after {n} seconds", 1),
    ("{n} hours from now", 3600),
    ("in {n} mins", 60),
)
FIXED_DELAYS: tuple[tuple[str, int], ...] = (
    ("in half an hour", 1800),
    ("in an hour", 3600),
    ("in a minute", 60),
    ("in a quarter of an hour", 900),
    ("in a couple of minutes", 120),
    ("in an hour and a half", 5400),
)


@dataclass(frozen=True)
class TaskSplits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    templates: dict[str, frozenset[str]] = field(default_factory=dict)

    def split(self, name: str) -> list[Example]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; one of {', '.join(SPLITS)}")
        return list(getattr(self, name))


def _assign_templates(ids: Sequence[str], rng: random.Random) -> dict[str, list[str]]:
    """Split template ids 60/20/20 (at least one each) into train/validation/test."""
    ids = list(ids)
    rng.shuffle(ids)
    n_val = max(1, round(len(ids) * 0.2))
    n_test = max(1, round(len(ids) * 0.2))
    return {"validation": ids[:n_val], "test": ids[n_val : n_val + n_test], "train": ids[n_val + n_test :]}


def _level_text(rng: random.Random, level: int, device: str) -> str:
    style = rng.randrange(4)
    if style == 0:
        return f"{level}%"
    if style == 1:
        return f"{level} percent"
    if style == 2:
        return f"{number_words(level)} percent"
    return f"{level}" if device != "blinds" else f"{level}%"


def _number(rng: random.Random, n: int) -> str:
    return number_words(n) if rng.random() < 0.5 else str(n)


class _Renderer:
    def __init__(self, rng: random.Random, delays: Sequence[tuple[str, int]]) -> None:
        self.rng = rng
        self.delays = delays

    def delay(self) -> tuple[str, int]:
        text, unit = self.rng.choice(self.delays)
        if "{n}" not in text:
            return text, unit
        n = self.rng.choice((2, 3, 5, 10, 15, 20, 30, 45)) if unit != 3600 else self.rng.choice((2, 3, 4, 6))
        return text.format(n=_number(self.rng, n)), n * unit

    def render(self, intent: str, template: str) -> tuple[str, dict[str, Any]]:
        rng = self.rng
        room = rng.choice(list(ROOMS))
        room_word = rng.choice(ROOMS[room])
        slots: dict[str, str] = {"room": room_word}
        action: dict[str, Any]
        if intent in ("on", "off"):
            device = rng.choice(SWITCHABLE)
            action = {"action": intent, "device": device, "room": room}
        elif intent == "set":
            device = rng.choice(LEVELED)
            level = rng.choice(range(0, 101, 5))
            slots["level"] = _level_text(rng, level, device)
            action = {"action": "set", "device": device, "room": room, "level": level}
        elif intent == "temperature":
            device = "thermostat"
            temp = rng.randint(16, 26)
            slots["temp"] = _number(rng, temp)
            action = {"action": "set", "device": device, "room": room, "temperature": temp}
        elif intent in ("open", "close"):
            device = "blinds"
            action = {"action": intent, "device": device, "room": room}
        elif intent in ("lock", "unlock"):
            device = "lock"
            action = {"action": intent, "device": device}
        elif intent == "none":
            device = rng.choice(SWITCHABLE)
            action = {"action": "none"}
        else:
            device = rng.choice(SWITCHABLE)
            slots["unsupported"] = rng.choice(UNSUPPORTED)
            slots["level"] = _level_text(rng, rng.choice(range(10, 101, 10)), "light")
            slots["delay_words"] = self.delay()[0].removeprefix("in ")
            action = {"action": "unsupported"}
        slots["device"] = rng.choice(DEVICES[device][0])
        text = template.format(**slots)
        if action["action"] not in ("none", "unsupported") and rng.random() < 0.35:
            phrase, seconds = self.delay()
            text = f"{phrase}, {text}" if rng.random() < 0.3 else f"{text} {phrase}"
            action["delay_s"] = seconds
        if rng.random() < 0.15:
            text = text.capitalize()
        if rng.random() < 0.1:
            text += rng.choice((".", "!", " please", " thanks"))
        return text, action


def action_schema() -> dict[str, Any]:
    """The JSON Schema of an answer (the module doc's schema, keys in `KEY_ORDER`), for constrained
    decoding (the agent's json_schema constraint, `[evaluation] task_schema` of a recipe)."""
    return {
        "type": "object",
        "properties": {
            "action": {"enum": ["on", "off", "set", "open", "close", "lock", "unlock", "none", "unsupported"]},
            "device": {"enum": list(DEVICES)},
            "room": {"enum": list(ROOMS)},
            "level": {"type": "integer", "minimum": 0, "maximum": 100},
            "temperature": {"type": "integer", "minimum": 10, "maximum": 30},
            "delay_s": {"type": "integer", "minimum": 1, "maximum": 86_400},
        },
        "required": ["action"],
        "additionalProperties": False,
        # llguidance: write the separators of `actions.target_text` (no free whitespace to wander in)
        "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
    }


def generate_splits(
    n_train: int = 2000, n_val: int = 200, n_test: int = 200, *, seed: int = 0, system: str | None = SYSTEM_PROMPT
) -> TaskSplits:
    """Examples for each split from disjoint templates (deterministic for a seed).

    Intents are drawn round-robin weighted to the command intents; within a split only that
    split's templates and delay phrasings are used.
    """
    rng = random.Random(seed)
    by_split: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS}
    for intent, templates in TEMPLATES.items():
        ids = [f"{intent}:{i}" for i in range(len(templates))]
        for split, chosen in _assign_templates(ids, rng).items():
            by_split[split][intent] = chosen
    delay_ids = [f"delay:{i}" for i in range(len(DELAYS))]
    fixed_ids = [f"fixed:{i}" for i in range(len(FIXED_DELAYS))]
    delay_split = _assign_templates(delay_ids, rng)
    fixed_split = _assign_templates(fixed_ids, rng)
    weights = {
        "on": 3,
        "off": 3,
        "set": 4,
        "temperature": 3,
        "open": 1,
        "close": 1,
        "lock": 1,
        "unlock": 1,
        "none": 2,
        "unsupported": 2,
    }
    intents = [i for i, w in weights.items() for _ in range(w)]
    out: dict[str, list[Example]] = {}
    used: dict[str, frozenset[str]] = {}
    for split, count in zip(SPLITS, (n_train, n_val, n_test), strict=True):
        split_rng = random.Random(f"{seed}:{split}")
        delays = [DELAYS[int(i.split(":")[1])] for i in delay_split[split]]
        delays += [FIXED_DELAYS[int(i.split(":")[1])] for i in fixed_split[split]]
        renderer = _Renderer(split_rng, delays)
        examples: list[Example] = []
        seen: set[str] = set()
        attempts = 0
        while len(examples) < count and attempts < count * 20:
            attempts += 1
            intent = split_rng.choice(intents)
            template_id = split_rng.choice(by_split[split][intent])
            template = TEMPLATES[intent][int(template_id.split(":")[1])]
            text, action = renderer.render(intent, template)
            if text in seen:
                continue
            seen.add(text)
            examples.append(Example.from_pair(text, target_text(action), system=system, template=template_id))
        out[split] = examples
        used[split] = frozenset(
            [t for ts in by_split[split].values() for t in ts] + delay_split[split] + fixed_split[split]
        )
    return TaskSplits(out["train"], out["validation"], out["test"], used)
