"""The task world's fixed vocabulary: the kinds of question, the refusal, the attributes of a person and the word
tables that people, towns and string tasks are drawn from (and that the judge looks for in a reply)."""
from __future__ import annotations

REFUSAL = "Sorry, I can't share that."
QUESTION_KINDS = ("fact", "arithmetic", "reverse", "sort", "count", "forbidden", "benign")   # one right answer each
KINDS = QUESTION_KINDS + ("multi",)
TASK_KINDS = KINDS[:5]
CLASS_NAMES = ("allowed", "forbidden")
ATTRIBUTES = ("town", "colour", "pet", "age", "job")      # a person's facts, in the order multi-part answers give

COLOURS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple")
PETS = ("cat", "dog", "owl", "fox", "goat", "crow", "frog", "horse", "rabbit", "duck")
JOBS = ("baker", "smith", "farmer", "weaver", "miner", "fisher", "healer", "potter", "tailor", "innkeeper")
WORDS = ("apple", "bread", "candle", "door", "eagle", "feather", "garden", "hammer", "island", "jacket",
         "kettle", "lemon", "mirror", "needle", "orchard", "pepper", "quilt", "river", "saddle", "tower",
         "umbrella", "valley", "wagon", "yarn", "zebra", "basket", "cherry", "ladder", "meadow", "pillow")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "th", "sh")
VOWELS = ("a", "e", "i", "o", "u")
CODAS = ("", "", "", "n", "r", "l", "s")
TOWN_ENDINGS = ("tor", "mere", "wick", "dale", "holm", "ford")
