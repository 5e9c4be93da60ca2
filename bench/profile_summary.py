"""CPU time of a cProfile file by where the code lives: third-party package, app module
or standard library.

    uv run python -m bench.profile_summary PROFILE [--top 15]

For the statistics `webhook_path.py --profile DIR` writes; self time ("tottime") is
summed per package, so the shares add up to 100%.
"""

from __future__ import annotations

import argparse
import pstats
from collections import Counter


def place(filename: str) -> str:
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1].split("/", 1)[0]
    if "/app/" in filename:
        return "app/" + filename.split("/app/", 1)[1]
    if filename.startswith("~") or filename.startswith("<"):
        return "builtins (C functions)"
    return "stdlib " + filename.rsplit("/", 1)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()

    stats = pstats.Stats(args.profile)
    shares: Counter[str] = Counter()
    for (filename, _line, _name), row in stats.stats.items():  # type: ignore[attr-defined]
        shares[place(filename)] += row[2]  # tottime
    total = sum(shares.values())
    print(f"{total:.2f} s of CPU in {args.profile}")  # noqa: T201
    for where, seconds in shares.most_common(args.top):
        print(f"{seconds / total * 100:6.1f}%  {where}")  # noqa: T201


if __name__ == "__main__":
    main()
