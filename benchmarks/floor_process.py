"""The floor of a whole process: read the config, fetch every instance's getChats list and
decode each body, and nothing else (no database, no validation, no chatsync code).

    python benchmarks/floor_process.py --config etl.toml --workers 8

``benchmarks/process.py`` runs it side by side with ``etl sync --once`` on the same
config: the time a fresh process cannot go below. It reads the TOML file with ``tomllib``
(as chatsync does), sends each GET through one ``requests.Session`` whose pool holds
``--workers`` connections, from ``--workers`` threads, and decodes each body with
``orjson.loads`` (the parser chatsync and ``fleet.py``'s floor use; ``--decoder json``
for the standard library's). Tokens are read from ``api_token`` or, for
``api_token_env`` / ``api_token_file``, from where those point; none is ever printed.

Output: one JSON line, ``{"instances": N, "chats": total elements, "failed": N,
"statuses": {...}}``. Exit status 1 when any request did not answer 200 with a JSON array.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import requests
from requests.adapters import HTTPAdapter

DECODERS: dict[str, Callable[[bytes], Any]] = {"orjson": orjson.loads, "json": json.loads}


def token_of(inst: dict[str, Any], config_dir: Path) -> str:
    if "api_token" in inst:
        return str(inst["api_token"]).strip()
    if "api_token_env" in inst:
        return os.environ[inst["api_token_env"]].strip()
    path = Path(inst["api_token_file"])
    return (path if path.is_absolute() else config_dir / path).read_text().strip()


def urls(config_path: Path) -> list[str]:
    """The getChats URL of every enabled instance (the token is in the path, as Green-API
    wants it)."""
    raw = tomllib.loads(config_path.read_text(encoding="utf-8"))
    default_url = raw.get("defaults", {}).get("api_url", "https://api.green-api.com")
    out = []
    for inst in raw.get("instances", []):
        if not inst.get("enabled", True):
            continue
        base = str(inst.get("api_url") or default_url).rstrip("/")
        token = token_of(inst, config_path.parent)
        out.append(f"{base}/waInstance{inst['id_instance']}/getChats/{token}")
    return out


def fetch_all(targets: Sequence[str], workers: int, decode: Callable[[bytes], Any]) -> Counter[str]:
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=workers, pool_maxsize=workers)
    session.mount("http://", adapter)
    session.mount("https://", adapter)

    def one(url: str) -> tuple[str, int]:
        response = session.get(url, timeout=(5, 40), allow_redirects=False)
        if response.status_code != 200:
            return str(response.status_code), 0
        data = decode(response.content)
        return ("200", len(data)) if isinstance(data, list) else ("not_a_list", 0)

    counts: Counter[str] = Counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for status, chats in pool.map(one, targets):
            counts[f"status_{status}"] += 1
            counts["chats"] += chats
    session.close()
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--decoder", choices=sorted(DECODERS), default="orjson")
    args = p.parse_args(argv)
    targets = urls(args.config)
    counts = fetch_all(targets, args.workers, DECODERS[args.decoder])
    statuses = {k.removeprefix("status_"): v for k, v in counts.items() if k.startswith("status_")}
    failed = len(targets) - statuses.get("200", 0)
    line = {"instances": len(targets), "chats": counts["chats"], "failed": failed}
    print(json.dumps(line | {"statuses": statuses}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
