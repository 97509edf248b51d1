"""The restricted email engine: work and output limits, the allow-list of tags and
filters, and a loader that sees email templates only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.template import Context, TemplateDoesNotExist, TemplateSyntaxError

from email_service import rendering, template_engine
from email_service.exceptions import InvalidEmailRequest
from email_service.template_engine import (
    EmailTemplateError,
    EmailTemplateSyntaxError,
    TemplateLimitExceeded,
    UnknownEmailTemplate,
)
from email_service.validation import check_template

# The reproduction: seven nested loops over a 10-character string, 197 characters; it
# took 21.5 s in a preview and 38 s a message in a worker before the limits.
NESTED = "{% for a in x %}" * 7 + "." + "{% endfor %}" * 7
TEN = {"x": "0123456789"}


def _render(source: str, context: dict[str, Any] | None = None, **kwargs: Any) -> str:
    return template_engine.render(template_engine.from_string(source), context or {}, **kwargs)


# --------------------------------------------------------------------------------------
# Work and output limits
# --------------------------------------------------------------------------------------


def test_the_nested_loop_subject_is_refused_by_the_work_limit() -> None:
    assert len(NESTED) == 197

    with pytest.raises(TemplateLimitExceeded, match=r"work limit exceeded \(more than 20000 steps"):
        rendering.render_subject(NESTED, TEN)


def test_a_limit_is_an_email_template_error_and_a_value_error() -> None:
    with pytest.raises(EmailTemplateError) as caught:
        _render(NESTED, TEN)

    assert isinstance(caught.value, ValueError)
    assert str(caught.value) == "template work limit exceeded (more than 20000 steps)"


def test_empty_loops_still_pay_for_their_iterations() -> None:
    # 200 x 200 iterations and not one node inside the inner loop.
    source = "{% for a in x %}{% for b in x %}{% endfor %}{% endfor %}"

    with pytest.raises(TemplateLimitExceeded, match="work limit"):
        _render(source, {"x": "y" * 200})


def test_the_limits_come_from_the_settings(settings: Any) -> None:
    settings.MAILROOM_TEMPLATE_MAX_STEPS = 100
    settings.MAILROOM_TEMPLATE_MAX_OUTPUT_BYTES = 2000

    assert _render("{% for a in x %}.{% endfor %}", {"x": "y" * 40}) == "." * 40
    with pytest.raises(TemplateLimitExceeded, match="more than 100 steps"):
        _render("{% for a in x %}.{% endfor %}", {"x": "y" * 200})
    with pytest.raises(TemplateLimitExceeded, match="more than 2000 bytes"):
        _render("{{ x }}", {"x": "y" * 2001})


class _Probe:
    """Counts how often the template reads it: how far a loop got before it stopped."""

    def __init__(self) -> None:
        self.reads = 0

    def hit(self) -> str:
        self.reads += 1
        return ""


def test_output_is_counted_as_it_grows_inside_a_loop() -> None:
    probe = _Probe()
    context = {"rows": range(1000), "big": "b" * 100_000, "probe": probe}

    with pytest.raises(TemplateLimitExceeded, match="output limit exceeded"):
        _render("{% for r in rows %}{{ big }}{{ probe.hit }}{% endfor %}", context)
    # 1 MiB is eleven rows of 100 kB: the loop stopped there, not after 1000 rows.
    assert probe.reads <= 11


def test_a_value_doubled_in_nested_withs_is_refused_before_it_is_printed() -> None:
    source = "{% with s=s|add:s %}" * 40 + "{{ s|length }}" + "{% endwith %}" * 40

    with pytest.raises(TemplateLimitExceeded, match="a value of more than"):
        _render(source, {"s": "ab"})


def test_a_limit_inside_an_if_comparison_still_fails_the_render() -> None:
    # Django swallows errors in {% if %} comparisons (the render would go on to "ok");
    # the refusal is remembered and fails the render at its end.
    with pytest.raises(TemplateLimitExceeded, match="a value of more than"):
        _render("{% if s|add:s == 1 %}y{% endif %}ok", {"s": "a" * 600_000})


def test_a_join_separator_is_counted_before_joining() -> None:
    with pytest.raises(TemplateLimitExceeded, match="a value of more than"):
        _render("{{ items|join:sep }}", {"items": list(range(10_000)), "sep": "-" * 200})


def test_floatformat_precision_is_capped() -> None:
    assert _render("{{ v|floatformat:2 }}", {"v": 1234.5678}) == "1234.57"
    with pytest.raises(TemplateLimitExceeded, match="floatformat"):
        _render('{{ v|floatformat:"100000000" }}', {"v": 1.5})


def test_a_template_rendered_directly_still_has_a_budget() -> None:
    template = template_engine.from_string(NESTED)

    with pytest.raises(TemplateLimitExceeded):
        template.render(Context(TEN))


def test_include_nesting_is_capped(tmp_path: Path) -> None:
    # A template that includes itself stops at the nesting limit, not Python's recursion.
    emails = tmp_path / "emails"
    emails.mkdir()
    (emails / "loop.html").write_text('x{% include "emails/loop.html" %}')
    engine = template_engine._EmailEngine(tmp_path)

    with pytest.raises(TemplateLimitExceeded, match=r"nesting limit exceeded \(more than 10"):
        engine.get_template("emails/loop.html").render(Context({}))


def test_a_render_does_not_change_the_callers_context() -> None:
    context = {"name": "Ann"}

    assert _render('{% now "Y" as name %}{{ name }}', context).isdigit()
    assert context == {"name": "Ann"}


# --------------------------------------------------------------------------------------
# The allow-list
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{% load static %}", "Invalid block tag on line 1: 'load'"),
        ("{% debug %}", "Invalid block tag on line 1: 'debug'"),
        ('{% url "admin:index" %}', "Invalid block tag on line 1: 'url'"),
        ("{% csrf_token %}", "Invalid block tag on line 1: 'csrf_token'"),
        ("{% lorem 9999 w %}", "Invalid block tag on line 1: 'lorem'"),
        ("{% widthratio 1 2 3 %}", "Invalid block tag on line 1: 'widthratio'"),
        ('{{ x|ljust:"99999999" }}', "Invalid filter: 'ljust'"),
        ('{{ x|center:"99999999" }}', "Invalid filter: 'center'"),
        ('{{ x|stringformat:"99999999s" }}', "Invalid filter: 'stringformat'"),
        ("{{ x|pprint }}", "Invalid filter: 'pprint'"),
        ("{{ x|make_list }}", "Invalid filter: 'make_list'"),
    ],
)
def test_tags_and_filters_outside_the_allow_list_are_syntax_errors(
    source: str, message: str
) -> None:
    with pytest.raises(EmailTemplateSyntaxError) as caught:
        template_engine.from_string(source)

    assert message in str(caught.value)
    assert isinstance(caught.value, TemplateSyntaxError)  # what Django callers expect


def test_the_allowed_tags_and_filters_render() -> None:
    source = (
        "{% with n=name|upper %}{{ n }}{% endwith %}: {{ items|join:', ' }}, "
        "{{ items|length }} item{{ items|length|pluralize }}, {{ price|floatformat:2 }}"
        "{% for i in items %}{% cycle ' a' ' b' %}{% endfor %}"
        "{% if missing %}!{% else %}.{% endif %}{{ title|default:'none'|truncatechars:3 }}"
        "{% filter lower %} OK{% endfilter %}{% spaceless %} <b> x </b> {% endspaceless %}"
        "{% templatetag openblock %}{% verbatim %}{{ raw }}{% endverbatim %}{# gone #}"
    )
    context = {"name": "ann", "items": ["a", "b", "c"], "price": 3.14159}

    assert _render(source, context, autoescape=False) == (
        "ANN: a, b, c, 3 items, 3.14 a b a.no\u2026 ok<b> x </b>{%{{ raw }}"
    )


# --------------------------------------------------------------------------------------
# The loader: email templates only
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "admin/base.html",
        "registration/login.html",
        "dashboard/index.html",
        "../settings.py",
        "emails/../dashboard/index.html",
        "emails/../../messaging_platform/settings.py",
        "/etc/passwd",
        "emails//etc/passwd",
        "emails/nope.html",
        "",
    ],
)
def test_only_email_templates_can_be_loaded(name: str) -> None:
    with pytest.raises(UnknownEmailTemplate) as caught:
        template_engine.get_template(name)

    assert str(caught.value).startswith(f"unknown template {name!r}")
    assert isinstance(caught.value, TemplateDoesNotExist)
    assert template_engine.find_template(name) is None


@pytest.mark.parametrize(
    "source",
    [
        '{% include "admin/base.html" %}',
        '{% include "../../settings.py" %}',
        '{% include "./welcome.html" %}',
        '{% include "/etc/passwd" %}',
        '{% include "emails/x/../../../messaging_platform/settings.py" %}',
        '{% extends "registration/login.html" %}',
        '{% extends "../base.html" %}',
        "{% include name %}",
        "{% extends name %}",
        "{% include names %}",
    ],
)
def test_a_subject_cannot_include_or_extend_other_templates(source: str) -> None:
    context = {"name": "../../settings.py", "names": ["admin/base.html", "/etc/passwd"]}

    with pytest.raises(UnknownEmailTemplate) as caught:
        _render(source, context)

    message = str(caught.value)
    assert message.startswith("unknown template ")
    assert "NoneType" not in message
    assert "attribute" not in message


def test_email_templates_can_include_and_extend_email_templates() -> None:
    html = _render('{% include "emails/welcome.html" %}', {"name": "Ann <b>"})
    layout = _render('{% extends "emails/base.html" %}{% block title %}T{% endblock %}')

    assert "Welcome, Ann &lt;b&gt;!" in html
    assert "<title>T</title>" in layout


def test_the_shipped_templates_render_escaped_with_their_text_parts() -> None:
    welcome = rendering.render("welcome", "Hi", {"name": "Ann <b>"})
    newsletter = rendering.render("newsletter", "News", {"items": [{"title": "A & B"}]})

    assert "Welcome, Ann &lt;b&gt;!" in welcome.html
    assert "Welcome, Ann <b>!" in welcome.text  # from welcome.txt
    assert "A &amp; B" in newsletter.html
    assert "A & B" in newsletter.text  # converted from the HTML


def test_a_symlink_out_of_the_emails_folder_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "secret.html").write_text("secret")
    emails = tmp_path / "templates" / "emails"
    emails.mkdir(parents=True)
    (emails / "fine.html").write_text("fine {{ x }}")
    (emails / "evil.html").symlink_to(tmp_path / "secret.html")
    engine = template_engine._EmailEngine(tmp_path / "templates")

    assert engine.get_template("emails/fine.html").render(Context({"x": 1})) == "fine 1"
    with pytest.raises(UnknownEmailTemplate):
        engine.get_template("emails/evil.html")


def test_a_template_name_from_the_api_finds_emails_only_and_never_the_layout() -> None:
    assert check_template("welcome") == "welcome"
    with pytest.raises(InvalidEmailRequest) as layout:
        check_template("base")
    with pytest.raises(InvalidEmailRequest) as unknown:
        check_template("nope")

    assert layout.value.field == "template"
    assert "layout" in layout.value.message
    assert unknown.value.message == "unknown template 'nope'"
