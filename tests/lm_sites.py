"""Site text the tests make: each site writes sentences from a vocabulary of its own, so an adapter trained on
one site's text visibly lowers that site's perplexity (and is not expected to help the others').

`write_site(dir, site, n, seed)` writes `<dir>/<site>.jsonl` (plain `{"text": ...}` lines, or chat lines with
`chat=True`) and returns its path; train and held-out sets come from different seeds of the same grammar.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# Three sites, three disjoint vocabularies (subjects, verbs, objects, places), one sentence grammar.
VOCABULARIES: dict[str, dict[str, list[str]]] = {
    "harbour": {
        "subject": ["the skipper", "a fisherman", "the harbour master", "the deckhand", "old Morag"],
        "verb": ["mends", "hauls", "tars", "coils", "ties"],
        "object": ["the nets", "a lobster creel", "the mooring rope", "the dinghy", "the anchor chain"],
        "place": ["by the slipway", "at low tide", "on the quay", "near the lighthouse", "under the gulls"],
    },
    "orchard": {
        "subject": ["the grower", "a picker", "the cider maker", "the beekeeper", "young Tomas"],
        "verb": ["prunes", "grafts", "presses", "gathers", "stacks"],
        "object": [
            "the russet apples",
            "a pear tree",
            "the quince jelly",
            "the wooden ladders",
            "the crates",
        ],
        "place": [
            "in the blossom",
            "after the frost",
            "along the hedgerow",
            "beside the hives",
            "before harvest",
        ],
    },
    "observatory": {
        "subject": [
            "the astronomer",
            "a night assistant",
            "the telescope operator",
            "the comet hunter",
            "Dr Iyer",
        ],
        "verb": ["calibrates", "aligns", "photographs", "catalogues", "tracks"],
        "object": [
            "the spectrograph",
            "a variable star",
            "the mirror cell",
            "the galaxy survey",
            "the meteor shower",
        ],
        "place": ["under the dome", "at zenith", "through thin cloud", "past midnight", "on the mountain"],
    },
}
SITES = tuple(VOCABULARIES)


def sentence(site: str, rng: random.Random) -> str:
    v = VOCABULARIES[site]
    s, verb, o, p = (rng.choice(v[k]) for k in ("subject", "verb", "object", "place"))
    return f"{s.capitalize()} {verb} {o} {p}."


def documents(site: str, n: int, seed: int) -> list[str]:
    rng = random.Random(f"{site}:{seed}")
    return [" ".join(sentence(site, rng) for _ in range(rng.randint(2, 4))) for _ in range(n)]


def write_site(
    root: Path, site: str, n: int, seed: int, *, chat: bool = False, name: str | None = None
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name or site}.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for doc in documents(site, n, seed):
            if chat:
                question = f"What happens at the {site}?"
                record: dict[str, object] = {
                    "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": doc}]
                }
            else:
                record = {"text": doc}
            fh.write(json.dumps(record) + "\n")
    return path
