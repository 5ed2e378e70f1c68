"""A cover picture every day: today's topic from topics.txt, one image per date.

Run it from cron; a second run on the same day (a retry) finds the image there and does nothing:

    # m h  dom mon dow  command
    0 7 * * *  cd /srv/covers && /opt/zimage/.venv/bin/python cover.py --server http://gpu-box:8188 --out images

The token comes from ZIMAGE_TOKEN when the server needs one. The seed is the date, so a day's cover
can be made again exactly: `python cover.py --date 2026-12-01 --force`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

from zimage_serve.client import Client, ClientError

HERE = Path(__file__).resolve().parent
STYLE = "social media cover picture, bold composition, vivid colours, wide shot, no text except what is asked"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default=os.environ.get("ZIMAGE_URL", "http://127.0.0.1:8188"))
    parser.add_argument("--template", default="z-image-turbo")
    parser.add_argument("--topics", type=Path, default=HERE / "topics.txt")
    parser.add_argument("--out", type=Path, default=HERE / "images")
    parser.add_argument("--date", type=datetime.date.fromisoformat, default=datetime.date.today())
    parser.add_argument("--force", action="store_true", help="make the day's cover again")
    args = parser.parse_args()

    target = args.out / f"{args.date.isoformat()}.png"
    if target.exists() and not args.force:
        print(f"{target} is there already")
        return 0
    topics = [line.strip() for line in args.topics.read_text(encoding="utf-8").splitlines() if line.strip()]
    topic = topics[args.date.toordinal() % len(topics)]
    try:
        with Client(args.server, os.environ.get("ZIMAGE_TOKEN")) as client:
            result = client.generate(args.template, prompt=f"{topic}, {STYLE}", seed=int(args.date.strftime("%Y%m%d")))
    except ClientError as exc:
        print(f"cover for {args.date}: {exc}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f".{target.name}.part")
    part.write_bytes(result.data[0])
    part.replace(target)  # a whole file or none: a reader never sees half a cover
    print(f"{target}: {topic}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
