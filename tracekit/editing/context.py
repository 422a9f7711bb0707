"""Context templates: short texts sampled from the model itself, prefixed to the edit prompt.

ROME averages its key over the prompt preceded by such prefixes (and optimises its value
over all of them) so the edit generalises beyond one exact context. A template is
"<sampled text>. {}" where "{}" takes the edit prompt; the bare "{}" comes first.

Sampling is seeded (top-k, k = 5 as ROME), starts from a few common words (as MEMIT, so
no tokenizer-specific start token is needed), and the result is cached on disk keyed by
the model's weight fingerprint and the settings.
"""

from __future__ import annotations

import json
from typing import Sequence

from tracekit.cache import cache_dir, read_json, slug, write_atomic
from tracekit.identity import cache_identity
from tracekit.errors import check

STARTERS = ("The", "Therefore", "Because", "I", "You")
ROME_LENGTHS = ((5, 10), (10, 10))  # (tokens generated, number of templates)

_memory: dict[tuple, list[str]] = {}


def _clean(text: str) -> str:
    """One line, no braces (they would break str.format), no trailing space."""
    return " ".join(text.replace("{", " ").replace("}", " ").split())


def sample_templates(model, lengths: Sequence[tuple[int, int]], seed: int, top_k: int) -> list[str]:
    templates = ["{}"]
    for i, (length, count) in enumerate(lengths):
        starters = [STARTERS[j % len(STARTERS)] for j in range(count)]
        texts = model.generate(starters, max_new_tokens=length, top_k=top_k, seed=seed + i)
        templates += [_clean(s + t) + ". {}" for s, t in zip(starters, texts)]
    return templates


def context_templates(model, lengths: Sequence[tuple[int, int]] = ROME_LENGTHS, seed: int = 0,
                      top_k: int = 5, cache: bool = True, cache_root=None) -> list[str]:
    """``["{}", "<text>. {}", ...]``: the bare prompt plus ``count`` samples of each length."""
    lengths = tuple((int(n), int(c)) for n, c in lengths)
    check(all(n >= 1 and c >= 0 for n, c in lengths), f"context lengths must be (tokens >= 1, count >= 0) pairs, got {lengths}")
    if not any(c for _, c in lengths):
        return ["{}"]
    identity = cache_identity(model)
    settings = {"lengths": [list(x) for x in lengths], "seed": seed, "top_k": top_k, "starters": list(STARTERS)}
    key = (identity["fingerprint"], json.dumps(settings, sort_keys=True))
    if key in _memory:
        return list(_memory[key])
    path = None
    if cache:
        name = "-".join(f"{n}x{c}" for n, c in lengths) + f"-s{seed}-k{top_k}.json"
        path = cache_dir(cache_root) / "templates" / f"{slug(model.spec)}-{identity['fingerprint']}" / name
        stored = read_json(path) if path.exists() else None
        if stored and stored.get("identity") == identity and stored.get("settings") == settings:
            _memory[key] = stored["templates"]
            return list(stored["templates"])
    templates = sample_templates(model, lengths, seed, top_k)
    _memory[key] = templates
    if path is not None:
        payload = {"identity": identity, "settings": settings, "templates": templates}
        write_atomic(path, lambda p: p.write_text(json.dumps(payload, indent=1)))
    return list(templates)
