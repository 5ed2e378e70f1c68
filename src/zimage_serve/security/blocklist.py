"""The sensitive-word filter: every text a text encoder would read is matched against the operator's
rule files, after a normalisation that undoes the usual evasions.

Rule files (`--blocklist FILE`, repeatable): one rule a line, `#` starts a comment. A line is
`[id:] [word:] text`: an optional id (the refusal names it, never the words; by default the file's name
and line number), and `word:` for a Latin-script rule that must match a whole word (`ass` then does
not block `class`). Files are read again when they change, with no restart.

Normalisation, applied to rules and texts alike:
- NFKC (full-width letters become ASCII), then look-alikes folded to the Latin letter they imitate
  (Unicode's confusables data, UTS #39, from confusable_homoglyphs: Cyrillic `а`, Greek `ο`);
- compatibility decomposition with every combining mark dropped (`bännéd`, precomposed or not, is
  `banned`), and every default-ignorable code point dropped (soft hyphens, zero-width characters, Hangul
  fillers: invisible, so they split no word), then case folding;
- traditional Chinese to simplified (OpenCC's t2s);
- separators removed: whitespace, punctuation and symbols (`B A N N E D`, `b.a.n.n.e.d`, `禁-止` become
  `banned`, `禁止`).
Matching is one Aho-Corasick pass (pyahocorasick) over the compact text. A whole-word rule is checked
against the word boundaries of the text before its separators were removed, mapped to the compact
text, so `b a n` matches only where the spread-out letters stand as a word of their own.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ahocorasick
import opencc

from zimage_serve.errors import ZImageError

log = logging.getLogger(__name__)
RELOAD_CHECK_S = 1.0  # how often the files' modification times are looked at
# Unicode's Default_Ignorable_Code_Point (DerivedCoreProperties.txt): characters that show nothing.
DEFAULT_IGNORABLE = (
    (0x00AD, 0x00AD),
    (0x034F, 0x034F),
    (0x061C, 0x061C),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x206F),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFF8),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)
IGNORABLE = frozenset(chr(c) for first, last in DEFAULT_IGNORABLE for c in range(first, last + 1))


class BlocklistError(ZImageError):
    """A rule file that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class Rule:
    id: str
    text: str  # normalised, separators removed
    whole_word: bool


_converter: opencc.OpenCC | None = None
_converter_lock = threading.Lock()


def _t2s(text: str) -> str:
    global _converter
    if _converter is None:
        with _converter_lock:
            if _converter is None:
                _converter = opencc.OpenCC("t2s")
    converted: str = _converter.convert(text)
    return converted


def _separator(char: str) -> bool:
    category = unicodedata.category(char)
    # Spaces, punctuation, symbols (emoji too), controls and format characters.
    return category[0] in "ZPSC" and category != "Co"


_look_alikes: dict[str, str] | None = None


def _latin_look_alikes() -> dict[str, str]:
    """Each character that UTS #39's confusables data says imitates one ASCII letter or digit, mapped to it."""
    global _look_alikes
    if _look_alikes is None:
        from confusable_homoglyphs.confusables import confusables_data

        found: dict[str, str] = {}
        for char, homoglyphs in confusables_data.items():
            if len(char) != 1 or char.isascii():
                continue
            latin = sorted(h["c"] for h in homoglyphs if len(h["c"]) == 1 and h["c"].isascii() and h["c"].isalnum())
            if latin:
                found[char] = latin[-1]  # a lower-case letter before its capital, when both are there
        _look_alikes = found
    return _look_alikes


def normalise(text: str) -> tuple[str, list[int]]:
    """The compact form of `text`, and for each of its characters the index of the character it came
    from in the folded text (separators kept there, so word boundaries can be found again)."""
    folded = _folded(text)
    compact, where = [], []
    for index, char in enumerate(folded):
        if not _separator(char):
            compact.append(char)
            where.append(index)
    return "".join(compact), where


def _folded(text: str) -> str:
    look_alikes = _latin_look_alikes()
    skeleton = "".join(look_alikes.get(c, c) for c in unicodedata.normalize("NFKC", text))
    bare = "".join(
        c for c in unicodedata.normalize("NFKD", skeleton) if c not in IGNORABLE and unicodedata.category(c)[0] != "M"
    )
    folded = bare.casefold()
    if any("\u3400" <= c <= "\u9fff" or "\uf900" <= c <= "\ufaff" for c in folded):
        folded = _t2s(folded)  # positions refer to this converted text, whatever its length
    return folded


def _word_char(char: str) -> bool:
    return char.isalnum()


class Blocklist:
    """The rules of some files, matched in one pass; reloaded when a file changes (`match` looks at the
    files' times at most once a second)."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = [Path(f) for f in files]
        self._lock = threading.Lock()
        self._stamps: dict[Path, tuple[int, int] | None] = {}
        self._checked = 0.0
        self._automaton: ahocorasick.Automaton | None = None
        self.rules: list[Rule] = []
        self.load()

    def load(self) -> None:
        """Read every file (raises BlocklistError for a bad one; a reload that fails keeps the old rules)."""
        rules: list[Rule] = []
        stamps: dict[Path, tuple[int, int] | None] = {}
        for path in self.files:
            stamps[path] = _stamp(path)
            try:
                text = path.read_text("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise BlocklistError(f"--blocklist {path}: cannot be read ({exc})") from exc
            rules.extend(parse(text, path.name))
        automaton = ahocorasick.Automaton()
        by_text: dict[str, list[Rule]] = {}
        for rule in rules:
            by_text.setdefault(rule.text, []).append(rule)
        for text, same in by_text.items():
            automaton.add_word(text, tuple(same))
        if by_text:
            automaton.make_automaton()
        with self._lock:
            self.rules, self._stamps = rules, stamps
            self._automaton = automaton if by_text else None
            self._checked = time.monotonic()

    def _reload_if_changed(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_S:
            return
        self._checked = now
        if all(_stamp(path) == stamp for path, stamp in self._stamps.items()):
            return
        try:
            self.load()
            log.info("word filter reloaded: %d rules from %d files", len(self.rules), len(self.files))
        except BlocklistError as exc:  # keep filtering with the rules that worked
            log.error("word filter not reloaded, the old rules stay: %s", exc)
            self._stamps = {path: _stamp(path) for path in self._stamps}

    def match(self, text: str) -> str | None:
        """The id of the first rule `text` breaks, or None."""
        self._reload_if_changed()
        automaton = self._automaton
        if automaton is None or not text:
            return None
        compact, where = normalise(text)
        if not compact:
            return None
        folded: str | None = None
        for end, rules in automaton.iter(compact):
            for rule in rules:
                if not rule.whole_word:
                    return str(rule.id)
                if folded is None:
                    folded = _folded(text)
                start = end - len(rule.text) + 1
                if _stands_alone(folded, where[start], where[end]):
                    return str(rule.id)
        return None


def _stands_alone(folded: str, first: int, last: int) -> bool:
    """Whether folded[first..last] is a word of its own: no letter or digit right before or after it, and
    the characters between spread by one kind of separator at most (`b a n`, not `ba n`-style fragments
    of longer words)."""
    before = folded[first - 1] if first > 0 else " "
    after = folded[last + 1] if last + 1 < len(folded) else " "
    if _word_char(before) or _word_char(after):
        return False
    runs = _runs(folded[first : last + 1])
    # One word as it is, or spread out letter by letter (`b a n`, `b.a.n`), not pieces of other words.
    return len(runs) == 1 or all(len(run) == 1 for run in runs)


def _runs(text: str) -> list[str]:
    runs, current = [], ""
    for char in text:
        if _word_char(char):
            current += char
        elif current:
            runs.append(current)
            current = ""
    if current:
        runs.append(current)
    return runs


def parse(text: str, source: str) -> list[Rule]:
    rules = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        rule_id = f"{source}:{number}"
        head, colon, rest = line.partition(":")
        if colon and head.strip() and head.strip() != "word" and " " not in head.strip():
            rule_id, line = head.strip(), rest.strip()
        whole_word = False
        if line.startswith("word:"):
            whole_word, line = True, line[5:].strip()
        compact, _ = normalise(line)
        if not compact:
            raise BlocklistError(f"--blocklist {source} line {number}: the rule has no letters to match")
        if whole_word and not compact.isascii():
            whole_word = False  # words are told apart by spaces only in Latin scripts
        rules.append(Rule(rule_id, compact, whole_word))
    return rules


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size
