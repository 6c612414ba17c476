"""The texts people see: zh_CN stays the article's, byte for byte; every locale is complete."""

from pathlib import Path

import pytest

from chatd.templates import ADMIN_NAMES, FIELDS, LOCALES, template_problem

SEED = Path(__file__).resolve().parents[2] / "shared" / "seed" / "original-article.txt"

#: The article's server texts, as its code builds them (with its own formatting styles).
ARTICLE = {
    "joined": "\n欢迎 %s 进入聊天室" % "小明",  # noqa: UP031
    "chat": "\n{} 说: {}".format("小明", "你好"),  # noqa: UP032
    "left": "\n%s 离开了聊天室" % "小明",  # noqa: UP031
    "name_taken": "该用户已存在",
}


def test_zh_cn_texts_are_the_articles_byte_for_byte():
    zh = LOCALES["zh_CN"]
    fields = {"name": "小明", "text": "你好"}
    for key, text in ARTICLE.items():
        assert zh[key].format(**fields).encode() == text.encode(), key
    # the article's admin speaks as a user named 管理员, through its chat line
    assert zh["admin"] == zh["chat"] and ADMIN_NAMES["zh_CN"] == "管理员"
    # a refused lookalike gets the article's own refusal, which its client understands
    assert zh["name_confusable"].encode() == "该用户已存在".encode()


@pytest.mark.skipif(not SEED.exists(), reason=f"reference article not present at {SEED}")
def test_zh_cn_texts_appear_in_the_article():
    article = SEED.read_text(encoding="utf-8")
    for snippet in ('"\\n欢迎 %s 进入聊天室"', '"\\n{} 说: {}"', '"\\n%s 离开了聊天室"',
                    '"该用户已存在"', '"管理员"'):
        assert snippet in article, snippet


@pytest.mark.parametrize("locale", sorted(LOCALES))
def test_every_locale_has_every_template_with_its_fields(locale):
    assert set(LOCALES[locale]) == set(FIELDS)
    for key, text in LOCALES[locale].items():
        assert template_problem(key, text) is None, key


def test_en_chat_and_admin_lines_differ_only_by_name():
    en = LOCALES["en"]
    assert en["chat"].format(name="admin", text="x") == en["admin"].format(name="admin", text="x")
    assert en["chat"].startswith("\n{name} ")  # so a line is the admin's only if the name is
