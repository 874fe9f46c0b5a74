"""Method names and personal-adapter variant names, defined once.

A method joins parts with '+': `base` (the task-adapted base alone), `oppu` (plus the user's personal adapter),
`pag` (the user's profile in the prompt) and `rag-kN` (N retrieved history items; `--methods` also takes a bare
`rag`, which RunConfig resolves to `--k`). A personal adapter is trained for one prompt setting, so its variant
names that setting: `k<N>`, plus `-pag` with a profile. The config's parser, the protocol's check of metric keys,
adapter names in node stores, export and the studies all derive from the patterns and functions here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PART = r"(base|oppu|pag|rag-k[1-9][0-9]*)"
NAME = rf"{PART}(\+{PART})*"
VARIANT = r"k(0|[1-9][0-9]*)(-pag)?"


@dataclass(frozen=True)
class Method:
    """An evaluated method: personal adapter or not, retrieved items, profile or not."""

    name: str
    personal: bool
    k: int
    profile: bool

    @property
    def variant(self) -> str:
        """Names the personal adapter this method needs (one per prompt setting, as in the paper)."""
        return f"k{self.k}" + ("-pag" if self.profile else "")


def method_name(personal: bool, k: int = 0, profile: bool = False) -> str:
    """The canonical name of a method (`method_name(True, 2)` -> 'oppu+rag-k2'; nothing at all -> 'base')."""
    parts = [*(["oppu"] if personal else []), *([f"rag-k{k}"] if k else []), *(["pag"] if profile else [])]
    return "+".join(parts) or "base"


def parse_method(name: str) -> Method:
    """'oppu+rag-k2' -> Method(personal=True, k=2, profile=False); errors list what is allowed."""
    personal, k, profile = False, 0, False
    for part in name.split("+"):
        if not re.fullmatch(PART, part):
            raise ValueError(
                f"method {name!r}: unknown part {part!r}; expected base, oppu, pag, rag or rag-kN (N >= 1) joined by '+'"
            )
        personal, profile = personal or part == "oppu", profile or part == "pag"
        k = int(part.removeprefix("rag-k")) if part.startswith("rag-k") else k
    return Method(name, personal, k, profile)


def parse_variant(variant: str) -> Method:
    """The method whose personal adapter `variant` names (k0 -> oppu, k2 -> oppu+rag-k2, k0-pag -> oppu+pag)."""
    found = re.fullmatch(VARIANT, variant)
    if not found:
        raise ValueError(f"adapter variant {variant!r}: expected k<N> or k<N>-pag, e.g. k0, k1 or k0-pag")
    k, profile = int(found[1]), bool(found[2])
    return Method(method_name(True, k, profile), True, k, profile)
