"""How often the word filter blocks an ordinary prompt: its false-positive rate, on English and Chinese.

The rules: better-profanity's published English list (944 entries, as whole-word rules, as an operator
would write them) and a list of Chinese terms an operator of an image service would block. The prompts:
made from everyday words (subjects, settings, styles, light) with a fixed seed, each with a negative
prompt as image prompts have one, screened the way the server screens a job (each text, and the texts
joined). Every prompt blocked is printed, so a rate can be read and judged.

    .venv/bin/python benchmarks/filter_false_positives.py --prompts 3000
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import better_profanity

from zimage_serve.security.blocklist import Blocklist

CHINESE_RULES = [
    "色情",
    "裸体",
    "裸照",
    "性交",
    "强奸",
    "卖淫",
    "嫖娼",
    "赌博",
    "毒品",
    "吸毒",
    "海洛因",
    "冰毒",
    "枪支",
    "炸药",
    "恐怖袭击",
    "自杀",
    "自残",
    "血腥",
    "虐待",
    "儿童色情",
    "法轮功",
    "台独",
    "藏独",
]
EN_SUBJECTS = [
    "cat",
    "dog",
    "fox",
    "owl",
    "horse",
    "lighthouse",
    "teapot",
    "bicycle",
    "violin",
    "robot",
    "dragon",
    "castle",
    "bridge",
    "sailboat",
    "mountain",
    "forest",
    "river",
    "garden",
    "city street",
    "market",
    "astronaut",
    "chef",
    "old fisherman",
    "girl with a red umbrella",
    "boy reading a book",
    "cottage",
    "waterfall",
    "desert",
    "glass of lemonade",
    "bowl of ramen",
    "birthday cake",
    "vintage car",
    "train",
    "butterfly",
    "koi fish",
    "sunflower field",
    "snowy village",
    "library",
    "cafe",
    "classroom",
    "spaceship",
    "samurai",
    "knight",
    "wizard",
    "ballerina",
    "jazz band",
    "skyscraper",
    "temple",
    "panda",
    "penguin",
    "rabbit",
    "tiger",
    "whale",
    "coral reef",
    "pumpkin",
    "basket of apples",
    "pair of sneakers",
    "leather handbag",
    "wristwatch",
    "perfume bottle",
    "ceramic vase",
    # Everyday words holding a listed word inside them (the "Scunthorpe problem"):
    "peacock",
    "cocktail glass",
    "bass guitar",
    "grape harvest",
    "classic typewriter",
    "analog synthesizer",
    "Scunthorpe market square",
    "shih tzu puppy",
    "therapist's office",
    "Dickens novel",
    "hancock tower",
    "cumulus clouds",
    "assassin in a cloak",
    "spice rack",
    "title card",
]
EN_ADJECTIVES = [
    "tiny",
    "giant",
    "ancient",
    "futuristic",
    "cozy",
    "lonely",
    "happy",
    "sleepy",
    "colorful",
    "golden",
    "misty",
    "rustic",
    "elegant",
    "playful",
    "majestic",
    "weathered",
    "shiny",
    "fluffy",
    "minimalist",
    "ornate",
    "abandoned",
    "glowing",
    "frozen",
    "sunlit",
    "wooden",
    "paper",
    "glass",
    "neon",
    "pastel",
    "classic",
    "modern",
    "curious",
    "brave",
    "quiet",
    "busy",
]
EN_SETTINGS = [
    "on a hill",
    "by the sea",
    "in the rain",
    "at sunset",
    "under the stars",
    "in a snowstorm",
    "in a busy market",
    "on a kitchen table",
    "in a quiet library",
    "on a white background",
    "in an autumn forest",
    "at dawn",
    "on the moon",
    "in a flower field",
    "on a rooftop",
    "in the fog",
    "beside a campfire",
    "in a glass jar",
    "on a wooden desk",
    "in a studio",
]
EN_STYLES = [
    "watercolor",
    "oil painting",
    "photograph",
    "35mm film",
    "studio product photo",
    "pencil sketch",
    "anime style",
    "pixel art",
    "3d render",
    "ukiyo-e print",
    "children's book illustration",
    "cinematic still",
    "isometric illustration",
    "charcoal drawing",
    "low poly",
    "impressionist",
]
EN_LIGHT = [
    "soft light",
    "golden hour",
    "dramatic lighting",
    "backlit",
    "overcast",
    "neon glow",
    "candlelight",
    "high key",
    "moody shadows",
    "rim light",
]
EN_NEGATIVE = [
    "blurry, low quality, watermark, text",
    "extra fingers, deformed hands",
    "oversaturated, noise",
    "jpeg artifacts, cropped",
    "bad anatomy, duplicate",
    "",
]
ZH_SUBJECTS = [
    "小猫",
    "小狗",
    "狐狸",
    "猫头鹰",
    "骏马",
    "灯塔",
    "茶壶",
    "自行车",
    "小提琴",
    "机器人",
    "巨龙",
    "城堡",
    "石桥",
    "帆船",
    "雪山",
    "竹林",
    "小河",
    "花园",
    "老街",
    "菜市场",
    "宇航员",
    "厨师",
    "老渔夫",
    "撑伞的女孩",
    "读书的男孩",
    "小木屋",
    "瀑布",
    "沙漠",
    "一杯柠檬水",
    "一碗拉面",
    "生日蛋糕",
    "老爷车",
    "火车",
    "蝴蝶",
    "锦鲤",
    "向日葵田",
    "雪中村庄",
    "图书馆",
    "咖啡馆",
    "教室",
    "飞船",
    "武士",
    "骑士",
    "舞者",
    "乐队",
    "摩天大楼",
    "寺庙",
    "熊猫",
    "企鹅",
    "兔子",
    "老虎",
    "鲸鱼",
    "珊瑚礁",
    "南瓜",
    "一篮苹果",
    "运动鞋",
    "皮包",
    "手表",
    "香水瓶",
    "青花瓷瓶",
    "灯笼",
    "旗袍",
    "水墨山水",
    "月饼",
    "饺子",
]
ZH_ADJECTIVES = [
    "小小的",
    "巨大的",
    "古老的",
    "未来感的",
    "温馨的",
    "孤独的",
    "快乐的",
    "慵懒的",
    "五彩的",
    "金色的",
    "朦胧的",
    "质朴的",
    "优雅的",
    "调皮的",
    "雄伟的",
    "闪亮的",
    "毛茸茸的",
    "极简的",
    "华丽的",
    "废弃的",
    "发光的",
    "冰冻的",
    "阳光下的",
    "木制的",
    "纸做的",
    "玻璃的",
    "霓虹的",
    "淡彩的",
]
ZH_SETTINGS = [
    "在山坡上",
    "在海边",
    "在雨中",
    "在日落时",
    "在星空下",
    "在暴风雪中",
    "在热闹的集市",
    "在厨房桌上",
    "在安静的图书馆",
    "白色背景",
    "在秋天的树林",
    "在黎明",
    "在月球上",
    "在花田里",
    "在屋顶上",
    "在雾中",
    "在篝火旁",
    "在玻璃罐里",
    "在木桌上",
    "在摄影棚",
]
ZH_STYLES = [
    "水彩画",
    "油画",
    "照片",
    "胶片摄影",
    "产品摄影",
    "铅笔素描",
    "动漫风格",
    "像素画",
    "三维渲染",
    "浮世绘",
    "儿童绘本插画",
    "电影剧照",
    "等距插画",
    "炭笔画",
    "低多边形",
    "印象派",
    "国画",
    "工笔画",
]
ZH_LIGHT = ["柔光", "黄金时刻", "戏剧性光影", "逆光", "阴天", "霓虹光", "烛光", "高调", "暗调", "轮廓光"]
ZH_NEGATIVE = ["模糊，低质量，水印，文字", "多余的手指，变形的手", "过饱和，噪点", "画面裁切", ""]


def english(rng: random.Random) -> tuple[str, str]:
    prompt = (
        f"a {rng.choice(EN_ADJECTIVES)} {rng.choice(EN_SUBJECTS)} {rng.choice(EN_SETTINGS)}, "
        f"{rng.choice(EN_STYLES)}, {rng.choice(EN_LIGHT)}"
    )
    return prompt, rng.choice(EN_NEGATIVE)


def chinese(rng: random.Random) -> tuple[str, str]:
    prompt = (
        f"{rng.choice(ZH_ADJECTIVES)}{rng.choice(ZH_SUBJECTS)}，{rng.choice(ZH_SETTINGS)}，"
        f"{rng.choice(ZH_STYLES)}，{rng.choice(ZH_LIGHT)}"
    )
    return prompt, rng.choice(ZH_NEGATIVE)


LOOK_ALIKES = str.maketrans({"a": "\u0430", "e": "\u0435", "o": "\u043e", "p": "\u0440", "c": "\u0441", "x": "\u0445"})


def evaded(word: str, rng: random.Random) -> str:
    """A rule's word as someone would slip it past a naive filter: Cyrillic look-alikes, a zero-width
    space or a soft hyphen inside, an accent."""
    way = rng.randrange(4)
    if way == 0:
        return word.translate(LOOK_ALIKES)
    middle = max(1, len(word) // 2)
    if way == 1:
        return word[:middle] + "\u200b" + word[middle:]
    if way == 2:
        return word[:middle] + "\u00ad" + word[middle:]
    return word[0] + "\u0301" + word[1:]


def screened(blocklist: Blocklist, prompt: str, negative: str) -> str | None:
    """As the server screens a job's texts: each alone, then joined both ways."""
    texts = [t for t in (prompt, negative) if t]
    candidates = texts + ([prompt + negative, negative + prompt] if len(texts) == 2 else [])
    for text in candidates:
        rule = blocklist.match(text)
        if rule is not None:
            return rule
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=3000, help="prompts per language")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    wordlist = Path(better_profanity.__file__).parent / "profanity_wordlist.txt"
    words = [line.strip() for line in wordlist.read_text("utf-8").splitlines() if line.strip()]
    folder = tempfile.mkdtemp()  # the blocklist looks at its file again now and then: kept to the end
    rules = Path(folder) / "rules.txt"
    lines = [f"EN{i}: word: {w}" for i, w in enumerate(words)] + [f"ZH{i}: {w}" for i, w in enumerate(CHINESE_RULES)]
    rules.write_text("\n".join(lines) + "\n", "utf-8")
    blocklist = Blocklist([rules])
    print(
        f"rules: {len(words)} English (whole words, better-profanity {better_profanity.__version__}), "
        f"{len(CHINESE_RULES)} Chinese"
    )
    for language, make in (("English", english), ("Chinese", chinese)):
        rng = random.Random(args.seed)
        jobs = {make(rng) for _ in range(args.prompts * 3)}
        jobs_list = sorted(jobs)[: args.prompts]
        started = time.perf_counter()
        blocked = [(job, rule) for job in jobs_list if (rule := screened(blocklist, *job)) is not None]
        spent = time.perf_counter() - started
        rate = 100 * len(blocked) / len(jobs_list)
        print(
            f"{language}: {len(blocked)} of {len(jobs_list)} distinct prompts blocked ({rate:.2f} %), "
            f"{1e6 * spent / len(jobs_list):.0f} µs per job"
        )
        for (prompt, negative), rule in blocked[:20]:
            print(f"  {rule}: {prompt!r} / {negative!r}")
        # The same prompts with a rule's word slipped in, evaded: the filter must still see them.
        vocabulary = [w for w in words if w.isalpha()] if language == "English" else CHINESE_RULES
        planted = [
            (f"{prompt}, {evaded(rng.choice(vocabulary), rng)}", negative) for prompt, negative in jobs_list[:1000]
        ]
        caught = sum(screened(blocklist, *job) is not None for job in planted)
        print(f"  with a rule's word slipped in, evaded: {caught} of {len(planted)} caught")


if __name__ == "__main__":
    main()
