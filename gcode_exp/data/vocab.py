"""G-code tokenizer and vocabulary.

A line such as `G1 X-0.1254 Y2.5` becomes `BOS G1 X NUM_X_<b> Y NUM_Y_<b> EOS`.
- G and M words are COMMAND tokens (`G1`, `M30`); N (line numbers) and O (program numbers) are
  dropped; every other letter is a PARAMETER token followed by a NUMERIC token.
- Bucket scheme: for each parameter letter, the training files give a range [lo, hi]; it is cut
  into 10**digits equal buckets (digits=2 for v2, 4 for v1) and `NUM_X_37` means bucket 37 of X,
  the interval [lo + 37 w, lo + 38 w) with w = (hi - lo) / 10**digits. Sign and magnitude stay
  recoverable: decoding gives the bucket centre, within w/2 of the original for values inside the
  range. Values outside the training range fall into the edge bucket.
- Only tokens seen in the training files are in the vocabulary; anything else encodes as UNK.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

SPECIALS = ("PAD", "BOS", "EOS", "UNK")
PAD, BOS, EOS, UNK = range(4)
TYPES = ("SPECIAL", "COMMAND", "PARAMETER", "NUMERIC")
SPECIAL, COMMAND, PARAMETER, NUMERIC = range(4)
COMMAND_LETTERS = "GM"
IGNORED_LETTERS = "NO"
COMMENT = re.compile(r"\([^)]*\)|;.*$")
# a number: `1`, `1.`, `1.5`, `.5`, signed, with an exponent written straight after it (`1e3`, `1.5E-3`);
# `X1 E3` (with a space) stays two words
WORD = re.compile(r"([A-Z])\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:E[-+]?\d+)?)")


def parse_line(text: str) -> tuple[list[tuple[str, float]], int]:
    """Words of one G-code line as (letter, value), and how many unparseable chunks were dropped.

    Text after an unclosed `(` is a comment that never ended: dropped and counted, so that words
    inside it (`(move to X5`) are never read as commands. A number beyond float range counts too."""
    text = COMMENT.sub(" ", text.upper())
    dropped = 0
    if "(" in text:
        text, dropped = text[: text.index("(")], 1
    words, pos = [], 0
    for m in WORD.finditer(text):
        dropped += bool(text[pos : m.start()].strip())
        pos = m.end()
        letter, value = m.group(1), float(m.group(2))
        if not math.isfinite(value):
            dropped += 1
        elif letter not in IGNORED_LETTERS:
            words.append((letter, value))
    dropped += bool(text[pos:].strip())
    return words, dropped


def bucket_range(values: list[float], least: int = 20) -> tuple[tuple[float, float], list[float]]:
    """(lo, hi) of a parameter letter's buckets, and the values left out of it: with at least `least`
    distinct values, an extreme one farther from its neighbour than the span of all the others (one typo'd
    or test coordinate, `X999` among a 4-inch part's) is left out, so that it does not widen every bucket."""
    s = sorted(set(values))
    out: list[float] = []
    while len(s) >= least and s[-1] - s[-2] > s[-2] - s[0]:
        out.append(s.pop())
    while len(s) >= least and s[1] - s[0] > s[-1] - s[1]:
        out.append(s.pop(0))
    return (s[0], s[-1]), sorted(out)


@dataclass
class Vocab:
    """Token list plus per-letter bucket ranges; knows each token's type and how to decode it."""

    digits: int
    ranges: dict[str, tuple[float, float]]
    tokens: list[str]
    left_out: dict[str, list[float]] = field(default_factory=dict, repr=False, compare=False)  # `bucket_range`
    index: dict[str, int] = field(init=False, repr=False)
    encoded: dict[str, list[int]] = field(init=False, repr=False, compare=False)  # text -> ids, each parsed once

    def __post_init__(self) -> None:
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.encoded = {}

    @property
    def n_buckets(self) -> int:
        return 10**self.digits

    def __len__(self) -> int:
        return len(self.tokens)

    # --- buckets -------------------------------------------------------------------------------
    def bucket(self, letter: str, value: float) -> int:
        lo, hi = self.ranges[letter]
        if hi <= lo:
            return 0
        return min(max(int((value - lo) / (hi - lo) * self.n_buckets), 0), self.n_buckets - 1)

    def interval(self, letter: str, bucket: int) -> tuple[float, float]:
        lo, hi = self.ranges[letter]
        width = (hi - lo) / self.n_buckets
        return lo + bucket * width, lo + (bucket + 1) * width

    def numeric_token(self, letter: str, bucket: int) -> str:
        return f"NUM_{letter}_{bucket:0{self.digits}d}"

    # --- token structure -------------------------------------------------------------------------
    def token_type(self, token: str) -> int:
        if token in SPECIALS:
            return SPECIAL
        if token.startswith("NUM_"):
            return NUMERIC
        if token[0] in COMMAND_LETTERS and len(token) > 1:
            return COMMAND
        return PARAMETER

    @property
    def commands(self) -> list[str]:
        return [t for t in self.tokens if self.token_type(t) == COMMAND]

    @property
    def letters(self) -> list[str]:
        return [t for t in self.tokens if self.token_type(t) == PARAMETER]

    def structure(self) -> dict[str, list[int]]:
        """Per token id: type, command index, letter index, bucket (-1 where not applicable).
        The multi-head model and the metrics both decompose tokens with this one table."""
        commands, letters = self.commands, self.letters
        out = {"type": [], "command": [], "letter": [], "bucket": []}
        for t in self.tokens:
            kind = self.token_type(t)
            letter = t.split("_")[1] if kind == NUMERIC else t if kind == PARAMETER else None
            out["type"].append(kind)
            out["command"].append(commands.index(t) if kind == COMMAND else -1)
            out["letter"].append(letters.index(letter) if letter in letters else -1)
            out["bucket"].append(int(t.split("_")[2]) if kind == NUMERIC else -1)
        return out

    def type_counts(self) -> dict[str, int]:
        counts = Counter(TYPES[self.token_type(t)] for t in self.tokens)
        return {name: counts.get(name, 0) for name in TYPES}

    # --- text <-> ids ----------------------------------------------------------------------------
    def line_tokens(self, text: str) -> list[str]:
        """Token names of one line (without BOS/EOS); a letter unknown to the vocabulary gives UNK."""
        return self._tokens_of(parse_line(text)[0])

    def encode(self, text: str) -> list[int]:
        """BOS, the line's token ids, EOS (a new list: callers may change it)."""
        if text not in self.encoded:  # a recording repeats few texts over thousands of rows and windows
            self.encoded[text] = [BOS, *(self.index.get(t, UNK) for t in self.line_tokens(text)), EOS]
        return list(self.encoded[text])

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids back to G-code text; numbers become their bucket centres."""
        words: list[str] = []
        for i in ids:
            token = self.tokens[i]
            kind = self.token_type(token)
            if token == "EOS":
                break
            if kind in (COMMAND, PARAMETER):
                words.append(token)
            elif kind == NUMERIC:
                _, letter, bucket = token.split("_")
                lo, hi = self.interval(letter, int(bucket))
                text = f"{(lo + hi) / 2:.4f}".rstrip("0").rstrip(".")
                if words and words[-1] == letter:
                    words[-1] += text
                else:
                    words.append(f"{letter}{text}")
        return " ".join(words)

    def _tokens_of(self, words: list[tuple[str, float]]) -> list[str]:
        out: list[str] = []
        for letter, value in words:
            if letter in COMMAND_LETTERS:
                out.append(f"{letter}{value:g}")
            elif letter in self.ranges:
                out += [letter, self.numeric_token(letter, self.bucket(letter, value))]
            else:
                out += ["UNK", "UNK"]
        return out

    # --- building and saving ---------------------------------------------------------------------
    @classmethod
    def build(cls, lines: Iterable[str], digits: int) -> Vocab:
        """Vocabulary of the given lines: bucket ranges first, then every token they produce."""
        parsed = [parse_line(line)[0] for line in set(lines)]
        values: dict[str, list[float]] = {}
        for words in parsed:
            for letter, value in words:
                if letter not in COMMAND_LETTERS:
                    values.setdefault(letter, []).append(value)
        ranges, left_out = {}, {}
        for letter, v in sorted(values.items()):
            ranges[letter], out = bucket_range(v)
            if out:
                left_out[letter] = out
        vocab = cls(digits=digits, ranges=ranges, tokens=list(SPECIALS))
        seen = {t for words in parsed for t in vocab._tokens_of(words)}
        order = (COMMAND, PARAMETER, NUMERIC)
        body = sorted(seen, key=lambda t: (order.index(vocab.token_type(t)), t))
        return cls(digits=digits, ranges=ranges, tokens=[*SPECIALS, *body], left_out=left_out)

    def range_notes(self) -> list[str]:
        """One warning per parameter letter whose bucket range left values out (`bucket_range`)."""
        return [f"vocab: {letter} value{'s' * (len(out) > 1)} {', '.join(f'{x:g}' for x in out)} lie far beyond every "
                f"other {letter} ({self.ranges[letter][0]:g} .. {self.ranges[letter][1]:g}): left out of {letter}'s "
                "number buckets (read as the edge bucket), which would otherwise widen to fit them"
                for letter, out in self.left_out.items()]

    def to_dict(self) -> dict:
        types = [TYPES[self.token_type(t)] for t in self.tokens]
        return {"digits": self.digits, "ranges": self.ranges, "tokens": self.tokens, "types": types}

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        return cls(digits=d["digits"], ranges={k: tuple(v) for k, v in d["ranges"].items()}, tokens=list(d["tokens"]))

    def save(self, path) -> None:
        from gcode_exp.atomic import write_json

        write_json(path, self.to_dict())
