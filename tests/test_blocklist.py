"""The word filter: evasions that must not pass and harmless texts that must, in English and Chinese;
rule files, reloading, and the refusal a server gives."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.support.app import serving
from tests.support.jobs import small_job
from zimage_serve.security import blocklist as blocklist_module
from zimage_serve.security.audit_verify import records
from zimage_serve.security.blocklist import Blocklist, BlocklistError, normalise

RULES = """\
# an example list: made-up words, and two Chinese ones
R-BAN: banned
R-ASS: word: ass
R-KILL: word: kill
禁止
R-TW: 台湾独立
R-FP: 发票
secretword   # a rule without an id is named by its file and line
"""

EVASIONS = [
    ("banned", "R-BAN"),
    ("BANNED", "R-BAN"),
    ("B A N N E D", "R-BAN"),
    ("b.a.n.n.e.d", "R-BAN"),
    ("bann ed", "R-BAN"),
    ("b-a_n*n~e|d", "R-BAN"),
    ("ＢＡＮＮＥＤ", "R-BAN"),  # full-width
    ("b\u200ba\u200cn\u200dn\u2060e\ufeffd", "R-BAN"),  # zero-width characters between
    ("b̲a̲n̲n̲e̲d̲", "R-BAN"),  # combining marks
    ("a photo, totally bannedstuff", "R-BAN"),  # not a whole-word rule: inside a word too
    ("ass", "R-ASS"),
    ("my ass.", "R-ASS"),
    ("A S S", "R-ASS"),
    ("a.s.s", "R-ASS"),
    ("ＡＳＳ", "R-ASS"),
    ("kill!", "R-KILL"),
    ("禁止", "rules.txt:5"),
    ("禁-止", "rules.txt:5"),
    ("禁 止", "rules.txt:5"),
    ("禁\u200b止", "rules.txt:5"),
    ("请不要禁止这个", "rules.txt:5"),
    ("臺灣獨立", "R-TW"),  # traditional forms of a simplified rule
    ("台灣 獨立", "R-TW"),
    ("發票", "R-FP"),
    ("发。票", "R-FP"),
    ("SecretWord", "rules.txt:8"),
    ("s e c r e t w o r d", "rules.txt:8"),
    ("secret word", "rules.txt:8"),  # not whole-word: spaces inside do not hide it
    # Each evasion the filter was once walked around with:
    ("bánnéd", "R-BAN"),  # precomposed accents
    ("ba\u0301nne\u0300d", "R-BAN"),  # combining accents
    ("bаnnеd", "R-BAN"),  # Cyrillic а and е
    ("\u0392\u0391\u039d\u039d\u0395D", "R-BAN"),  # Greek capitals Beta, Alpha, Nu, Nu, Epsilon
    ("ban\u3164ned", "R-BAN"),  # a Hangul filler
    ("ban\u115fned", "R-BAN"),  # a Hangul choseong filler
    ("ban\u00adned", "R-BAN"),  # a soft hyphen
    ("my а\u0455\u0455", "R-ASS"),  # a whole-word rule in Cyrillic look-alikes
    ("my a\u200bss", "R-ASS"),  # a whole-word rule with a zero-width space inside the word
    ("my a\u00adss.", "R-ASS"),  # ... or a soft hyphen
    ("kil\u2060l them", "R-KILL"),  # ... or a word joiner
    ("kíll", "R-KILL"),  # ... or an accent
    ("禁\u3164止", "rules.txt:5"),  # a Hangul filler between Chinese characters
    ("臺\u00ad灣獨立", "R-TW"),
]

HARMLESS = [
    "a red circle on a blue background",
    "class",  # `ass` is whole-word
    "classic glass bass assassin passage",
    "as sorted",  # separators removed, but `as sorted` is not the word `ass`
    "skill killer",  # `kill` only as a word of its own
    "ban the ned",
    "一只红色的圆",
    "禁书",  # another word sharing a character
    "台湾菜 独特",
    "发出 票据",
    "",
    "   ",
    "🙂🙂🙂",
    "Привет, красивый закат над морем",  # Cyrillic text is not folded into a Latin rule
    "café au lait, naïve résumé",
    "어두운 밤하늘",  # Hangul, decomposed for matching, matches no rule
]


@pytest.fixture()
def blocklist(tmp_path: Path) -> Blocklist:
    path = tmp_path / "rules.txt"
    path.write_text(RULES, "utf-8")
    return Blocklist([path])


@pytest.mark.parametrize(("text", "rule"), EVASIONS)
def test_evasions_do_not_pass(blocklist: Blocklist, text: str, rule: str) -> None:
    assert blocklist.match(text) == rule


@pytest.mark.parametrize("text", HARMLESS)
def test_harmless_text_passes(blocklist: Blocklist, text: str) -> None:
    assert blocklist.match(text) is None


def test_normalisation_folds_width_case_and_script() -> None:
    assert normalise("ＡＢＣ abc")[0] == "abcabc"
    assert normalise("臺灣")[0] == "台湾"
    assert normalise("fοrbidden ρlan")[0] == "forbiddenplan"  # Greek omicron and rho, as Latin o and p
    assert normalise("ｃａｆé\u00ad")[0] == "cafe"
    compact, where = normalise("a b")
    assert compact == "ab" and where == [0, 2]


def test_rule_files_are_checked_and_reloaded_when_they_change(tmp_path: Path) -> None:
    path = tmp_path / "rules.txt"
    path.write_text("R1: alpha\n", "utf-8")
    blocklist = Blocklist([path])
    assert blocklist.match("alpha") == "R1" and blocklist.match("beta") is None
    path.write_text("R1: alpha\nR2: beta\n", "utf-8")
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    blocklist._checked = 0.0  # as if a second had passed
    assert blocklist.match("beta") == "R2"
    path.write_bytes(b"\xff\xfe not utf-8")  # a broken edit keeps the rules that worked
    os.utime(path, ns=(time.time_ns() + 2 * 10**9, time.time_ns() + 2 * 10**9))
    blocklist._checked = 0.0
    assert blocklist.match("beta") == "R2"
    with pytest.raises(BlocklistError, match="line 1"):
        (tmp_path / "empty.txt").write_text("R9: ...\n", "utf-8")
        Blocklist([tmp_path / "empty.txt"])
    with pytest.raises(BlocklistError, match=r"missing\.txt"):
        Blocklist([tmp_path / "missing.txt"])


def test_a_blocked_prompt_is_a_400_naming_the_rule_never_the_word_and_is_audited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rules = tmp_path / "rules.txt"
    rules.write_text("R-BAN: banned\n", "utf-8")
    data = tmp_path / "data"
    monkeypatch.setattr(blocklist_module, "RELOAD_CHECK_S", 0.0)  # the files' times looked at on every match
    with serving(data, security={"blocklist": (rules,)}, preload=False) as server:
        prompt = small_job("blocked")
        prompt["6"]["inputs"]["text"] = "a B.A.N.N.E.D circle"
        status, answer = server.json("POST", "/prompt", {"prompt": prompt})
        assert status == 400
        assert answer["error"]["type"] == "prompt_blocked" and "R-BAN" in answer["error"]["details"]
        assert "banned" not in json.dumps(answer).lower()
        assert answer["node_errors"]["6"]["errors"][0]["extra_info"]["rule"] == "R-BAN"
        status, _, body = server.request("POST", "/v1/images/generations", {"prompt": "banned", "size": "64x64"})
        assert status == 400 and b"R-BAN" in body and b"banned" not in body.lower()
        negative = small_job("negative")
        negative["34"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["30", 0], "text": "ｂａｎｎｅｄ"}}
        negative["3"]["inputs"]["negative"] = ["34", 0]  # a negative prompt is encoded too
        assert server.json("POST", "/prompt", {"prompt": negative})[0] == 400
        # A new rule takes effect without a restart.
        rules.write_text("R-BAN: banned\nR-NEW: 圓形\n", "utf-8")  # the nano prompt's word, in traditional form
        status, answer = server.json("POST", "/prompt", {"prompt": small_job("later")})
        assert status == 400 and "R-NEW" in answer["error"]["details"]
    blocked = [r for r in records(data / "audit") if r.get("outcome") == "blocked"]
    assert [r["rule"] for r in blocked] == ["R-BAN", "R-BAN", "R-BAN", "R-NEW"]
    assert all(r["status"] == 400 and r["route"] in ("/prompt", "/v1/images/generations") for r in blocked)
    # The text that was blocked is on record (for whoever reviews the log), as --audit-prompts says.
    assert [r["prompt"] for r in blocked][:3] == ["a B.A.N.N.E.D circle", "banned", "ｂａｎｎｅｄ"]


def test_the_shipped_example_list_loads() -> None:
    example = Blocklist([Path(__file__).resolve().parents[1] / "docs" / "blocklist.example.txt"])
    assert example.match("違禁詞") == "EX-3" and example.match("B A D W O R D") == "EX-2"
    assert example.match("a badwordy thing") is None and example.match("Forbidden-Word") == "EX-1"


@pytest.mark.parametrize(
    ("first", "second", "joiner", "rule"),
    [
        ("a red ban", "ned circle", "ConditioningConcat", "R-BAN"),
        ("ned circle", "a red ban", "ConditioningConcat", "R-BAN"),  # the nodes in the other order
        ("请不要禁", "止这个", "ConditioningCombine", "rules.txt:2"),
    ],
)
def test_a_word_split_across_two_text_encoders_is_caught(
    tmp_path: Path, first: str, second: str, joiner: str, rule: str
) -> None:
    rules = tmp_path / "rules.txt"
    rules.write_text("R-BAN: banned\n禁止\n", "utf-8")
    with serving(tmp_path / "data", security={"blocklist": (rules,)}, preload=False) as server:
        prompt = small_job("split")
        prompt["6"]["inputs"]["text"] = first
        prompt["34"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["30", 0], "text": second}}
        inputs = (
            {"conditioning_to": ["6", 0], "conditioning_from": ["34", 0]}
            if joiner == "ConditioningConcat"
            else {"conditioning_1": ["6", 0], "conditioning_2": ["34", 0]}
        )
        prompt["35"] = {"class_type": joiner, "inputs": inputs}
        prompt["3"]["inputs"]["positive"] = ["35", 0]
        status, answer = server.json("POST", "/prompt", {"prompt": prompt})
        assert status == 400 and answer["error"]["type"] == "prompt_blocked", answer
        assert answer["node_errors"][next(iter(answer["node_errors"]))]["errors"][0]["extra_info"]["rule"] == rule
        # Each half alone is harmless.
        prompt["34"]["inputs"]["text"] = "a blue square"
        assert server.json("POST", "/prompt", {"prompt": prompt})[0] == 200
