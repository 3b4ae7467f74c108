"""A tiny intent data set (6 intents x 8 training examples) for fast training tests."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.records import Record

INTENTS: dict[str, list[str]] = {
    "weather": [
        "will it rain tomorrow",
        "what is the weather like today",
        "is it going to snow this weekend",
        "how hot will it be on saturday",
        "do I need an umbrella today",
        "weather forecast for the next five days",
        "is it sunny in paris right now",
        "how cold is it outside",
        "will there be a storm tonight",
        "what's the temperature in berlin",
        "is it windy at the beach today",
    ],
    "music": [
        "play some relaxing jazz",
        "skip this song",
        "put on my workout playlist",
        "turn the music volume up",
        "play the latest album by adele",
        "who sings this song",
        "shuffle my favourite tracks",
        "pause the music",
        "play something by the beatles",
        "next track please",
        "add this song to my playlist",
    ],
    "banking": [
        "how much money is in my checking account",
        "transfer 50 dollars to my savings",
        "my card was declined at the shop",
        "show my last five transactions",
        "what is my account balance",
        "pay my credit card bill",
        "send money to my brother",
        "why was I charged a fee",
        "freeze my debit card",
        "how much did I spend last month",
        "set up a direct deposit",
    ],
    "calendar": [
        "schedule a meeting with sam tomorrow at 10",
        "add a dentist appointment on friday afternoon",
        "what is on my calendar next monday",
        "move my 2pm call to 4pm",
        "block two hours for studying on sunday",
        "cancel the team sync on thursday",
        "when is my next meeting",
        "invite anna to lunch on wednesday",
        "do I have anything planned tonight",
        "create an event for the party on saturday",
        "clear my schedule for tomorrow",
    ],
    "timer": [
        "set a timer for ten minutes",
        "start a countdown of 30 seconds",
        "how much time is left on my timer",
        "cancel the timer",
        "set a 5 minute timer for the eggs",
        "stop the countdown",
        "timer for one hour please",
        "pause my timer",
        "add two minutes to the timer",
        "set a timer for 45 minutes",
        "reset the kitchen timer",
    ],
    "translate": [
        "how do you say hello in spanish",
        "translate thank you into french",
        "what does danke mean in english",
        "say good night in italian",
        "translate where is the station to german",
        "what is cat in japanese",
        "how do I say I love you in portuguese",
        "translate this sentence to dutch",
        "what's the word for apple in russian",
        "how to say goodbye in korean",
        "translate please into polish",
    ],
}
OOS = [
    "what is the meaning of life",
    "tell me a joke about cats",
    "who won the football game",
    "how tall is mount everest",
    "recommend a good book",
    "what should I eat for dinner",
]


def split() -> tuple[list[Record], list[Record], list[Record]]:
    """(train: 8 per intent, val: 2 per intent + 3 oos, test: 1 per intent + 3 oos)."""
    train, val, test = [], [], []
    for label, texts in INTENTS.items():
        train += [Record(t, label) for t in texts[:8]]
        val += [Record(t, label) for t in texts[8:10]]
        test += [Record(t, label) for t in texts[10:]]
    val += [Record(t, "oos") for t in OOS[:3]]
    test += [Record(t, "oos") for t in OOS[3:]]
    return train, val, test


def write_jsonl(path: Path, records: list[Record]) -> Path:
    path.write_text(
        "".join(json.dumps({"text": r.text, "label": r.label}) + "\n" for r in records),
        encoding="utf-8",
    )
    return path
