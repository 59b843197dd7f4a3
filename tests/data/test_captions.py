import random

import pytest

from sdswarm.data.captions import caption_from_post, pretty_tag, shuffle_tags

API_POST = {
    "id": 1234,
    "tag_string": "1girl ^_^ hatsune_miku highres long_hair some_artist twintails vocaloid",
    "tag_string_general": "1girl ^_^ long_hair twintails",
    "tag_string_character": "hatsune_miku",
    "tag_string_copyright": "vocaloid",
    "tag_string_artist": "some_artist",
    "tag_string_meta": "highres",
}
EXPECTED = "hatsune miku, vocaloid, 1girl, ^_^, long hair, twintails"


def test_api_post_character_copyright_general_in_order_meta_and_artist_excluded() -> None:
    assert caption_from_post(API_POST) == EXPECTED


def test_gallery_dl_lists() -> None:
    post = {
        "id": 1234,
        "tags_general": ["1girl", "^_^", "long_hair", "twintails"],
        "tags_character": ["hatsune_miku"],
        "tags_copyright": ["vocaloid"],
        "tags_artist": ["some_artist"],
        "tags_meta": ["highres"],
    }
    assert caption_from_post(post) == EXPECTED


@pytest.mark.parametrize("as_type", [str, int])
def test_yearly_dump_with_string_or_int_categories(as_type: type) -> None:
    raw = [
        ("1girl", 0), ("^_^", 0), ("long_hair", 0), ("some_artist", 1), ("vocaloid", 3),
        ("hatsune_miku", 4), ("highres", 5), ("twintails", 0),
    ]  # fmt: skip
    post = {"id": "1234", "tags": [{"id": "1", "name": n, "category": as_type(c)} for n, c in raw]}
    assert caption_from_post(post) == EXPECTED


def test_yearly_dump_with_category_names() -> None:
    post = {"tags": [{"name": "long_hair", "category": "general"}, {"name": "miku", "category": "Character"}]}
    assert caption_from_post(post) == "miku, long hair"


def test_categories_order_and_separator_are_configurable() -> None:
    assert caption_from_post(API_POST, ("artist", "general"), " | ") == (
        "some artist | 1girl | ^_^ | long hair | twintails"
    )


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("^_^", "^_^"), (">_<", ">_<"), ("o_o", "o_o"), ("0_0", "0_0"), ("x_x", "x_x"), ("=_=", "=_="),
        ("(o)_(o)", "(o)_(o)"), ("long_hair", "long hair"), ("red_circle", "red circle"), ("1girl", "1girl"),
        ("two-tone_background", "two-tone background"), (";_;", ";_;"),
    ],
)  # fmt: skip
def test_underscores_become_spaces_except_in_kaomoji(tag: str, expected: str) -> None:
    assert pretty_tag(tag) == expected


def test_duplicates_dropped_first_occurrence_wins() -> None:
    post = {"tag_string_general": "solo long_hair solo original", "tag_string_copyright": "original"}
    assert caption_from_post(post) == "original, solo, long hair"


def test_no_tags_in_chosen_categories_gives_empty_caption() -> None:
    post = {"tag_string_general": "", "tag_string_artist": "someone", "tag_string_meta": "highres"}
    assert caption_from_post(post) == ""
    assert caption_from_post({"tags": []}) == ""


@pytest.mark.parametrize(
    ("post", "match"),
    [
        ([1, 2], "JSON object"),
        ({"id": 1}, "no tag_string_<category>"),
        ({"tag_string": "a b"}, "no tag_string_<category>"),
        ({"tags": "a b"}, "tags of type str"),
        ({"tag_string_general": 3}, "tag_string_general must be"),
        ({"tags_general": ["ok", 5]}, "tags_general must be"),
        ({"tags": [{"name": "x"}]}, r"tags\[0\]"),
        ({"tags": [{"name": "x", "category": 0}, {"name": "y", "category": 7}]}, r"tags\[1\].*category 7"),
        ({"tags": [{"name": "x", "category": "fanart"}]}, "unknown tag category 'fanart'"),
    ],
)
def test_invalid_shapes_raise_value_error_naming_the_problem(post: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        caption_from_post(post)  # type: ignore[arg-type]


@pytest.mark.parametrize("categories", [("general", "tags"), "general"])
def test_unknown_categories_rejected(categories: object) -> None:
    with pytest.raises(ValueError, match="categor"):
        caption_from_post(API_POST, categories)  # type: ignore[arg-type]


def test_parentheses_escaped_on_request() -> None:
    post = {"tag_string_character": "miku_(append)", "tag_string_general": "(o)_(o) smile"}
    assert caption_from_post(post) == "miku (append), (o)_(o), smile"  # left as they are by default
    assert caption_from_post(post, escape_parentheses=True) == r"miku \(append\), \(o\)_\(o\), smile"


def test_shuffle_keeps_the_first_tags_and_every_tag() -> None:
    caption = "miku, vocaloid, 1girl, long hair, twintails, smile"
    orders = {shuffle_tags(caption, ", ", 2, random.Random(seed)) for seed in range(30)}
    assert len(orders) > 5
    for order in orders:
        tags = order.split(", ")
        assert tags[:2] == ["miku", "vocaloid"] and sorted(tags) == sorted(caption.split(", "))
    assert shuffle_tags(caption, ", ", 2, random.Random(1)) == shuffle_tags(caption, ", ", 2, random.Random(1))
    assert shuffle_tags("a | b | c", " | ", 5, random.Random(0)) == "a | b | c"
