"""Danbooru post metadata -> training caption.

Three metadata shapes are understood:
  * Danbooru API / gallery-dl default: ``tag_string_<category>`` space-separated strings;
  * gallery-dl with ``"tags": true``: ``tags_<category>`` lists of tags;
  * the yearly Danbooru20xx dumps: ``tags`` as a list of ``{"name", "category"}`` where category is an
    int, a digit string or a category name.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

DEFAULT_CATEGORIES = ("character", "copyright", "general")
# Danbooru's numeric tag categories (as used by the dumps); 2 is unused upstream.
CATEGORY_IDS = {0: "general", 1: "artist", 3: "copyright", 4: "character", 5: "meta"}
CATEGORIES = frozenset(CATEGORY_IDS.values())

# Kaomoji rule: a tag keeps its underscores when it never has two letters/digits in a row (^_^, >_<,
# o_o, 0_0, x_x, (o)_(o)): there the underscore is the mouth. Word tags (red_hair, 1girl) always have such a
# run, so their underscores become spaces.
_WORD_RUN = re.compile(r"[^\W_]{2}")


def pretty_tag(tag: str) -> str:
    """Danbooru tag -> caption word(s): underscores become spaces except in kaomoji."""
    return tag.replace("_", " ") if _WORD_RUN.search(tag) else tag


def _split(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return [t.strip() for t in value if t.strip()]
    raise ValueError(f"{key} must be a string or a list of strings, got {type(value).__name__}")


def _category_name(value: Any, where: str) -> str:
    name: str | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        name = CATEGORY_IDS.get(value)
    elif isinstance(value, str):
        v = value.strip().lower()
        name = CATEGORY_IDS.get(int(v)) if v.isdigit() else (v if v in CATEGORIES else None)
    if name is None:
        raise ValueError(f"{where}: unknown tag category {value!r}")
    return name


def tags_by_category(post: Any) -> dict[str, list[str]]:
    """Raw (underscored) tags of a post grouped by category name; ValueError for unknown shapes."""
    if not isinstance(post, Mapping):
        raise ValueError(f"post must be a JSON object, got {type(post).__name__}")
    for prefix in ("tag_string_", "tags_"):
        found = {k[len(prefix) :]: _split(v, k) for k, v in post.items() if k.startswith(prefix)}
        if found:
            return found
    tags = post.get("tags")
    if not isinstance(tags, list):
        got = "no tags" if tags is None else f"tags of type {type(tags).__name__}"
        raise ValueError(
            f"post has no tag_string_<category>, tags_<category> or tags list of {{name, category}} ({got})"
        )
    out: dict[str, list[str]] = {}
    for i, tag in enumerate(tags):
        if not (isinstance(tag, Mapping) and isinstance(tag.get("name"), str) and "category" in tag):
            raise ValueError(
                f"tags[{i}] must be an object with a string 'name' and a 'category', got {tag!r}"
            )
        out.setdefault(_category_name(tag["category"], f"tags[{i}]"), []).append(tag["name"].strip())
    return out


def check_categories(categories: Sequence[str]) -> None:
    if isinstance(categories, str):  # a bare "general" would otherwise iterate letters
        raise ValueError(f"categories must be a sequence of names, got the string {categories!r}")
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise ValueError(f"unknown tag categories {unknown}; known: {sorted(CATEGORIES)}")


def caption_from_post(
    post: Mapping[str, Any],
    categories: Sequence[str] = DEFAULT_CATEGORIES,
    separator: str = ", ",
    escape_parentheses: bool = False,
) -> str:
    """Caption = tags of `categories` in that order, prettified, first occurrence wins; "" if none.
    `escape_parentheses`: write ``\\(`` and ``\\)``, for front ends that read parentheses as emphasis."""
    check_categories(categories)
    by_cat = tags_by_category(post)
    words = dict.fromkeys(pretty_tag(t) for c in categories for t in by_cat.get(c, ()) if t)
    if escape_parentheses:
        words = dict.fromkeys(w.replace("(", "\\(").replace(")", "\\)") for w in words)
    return separator.join(words)


def shuffle_tags(caption: str, separator: str, keep_first: int, rng: random.Random) -> str:
    """The caption's tags in a random order, the first `keep_first` (e.g. character, copyright) left in place:
    an augmentation applied each time a caption is used, so the model does not learn the tag order."""
    tags = caption.split(separator)
    head, tail = tags[:keep_first], tags[keep_first:]
    rng.shuffle(tail)
    return separator.join(head + tail)
