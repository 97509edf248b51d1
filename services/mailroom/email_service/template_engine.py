"""A restricted Django template engine for email bodies and subjects.

Email templates and (above all) campaign and preview subjects are code written by the
caller, so they are rendered by this engine and never by the project's own: it can see
only the ``emails/`` folder of this app's templates, knows an allow-list of tags and
filters, and counts the work and the output of every render.

Tags: autoescape, block, comment, cycle, extends, filter, firstof, for, if, ifchanged,
include, now, regroup, resetcycle, spaceless, templatetag, verbatim, with. Refused (an
"Invalid block tag" syntax error): load (no other libraries), debug (dumps the context),
url and csrf_token (project internals), lorem (output of any size), widthratio and
querystring (no use in email).

Filters: add, capfirst, cut, date, default, default_if_none, dictsort,
dictsortreversed, divisibleby, escape, escapeseq, filesizeformat, first, floatformat (at
most MAX_DECIMAL_PLACES places), force_escape, get_digit, iriencode, join (separator
times items counted before joining), last, length, linebreaks, linebreaksbr, lower,
pluralize, random, safe, safeseq, slice, slugify, striptags, time, title, truncatechars,
truncatechars_html, truncatewords, truncatewords_html, upper, urlencode, urlize,
wordcount, wordwrap, yesno. Refused: center, ljust, rjust and stringformat (a width
argument makes output of any size), make_list, pprint, addslashes, escapejs,
json_script, linenumbers, phone2numeric, unordered_list, urlizetrunc, timesince and
timeuntil (a context is JSON: no dates for them, and they fail on strings).

Work is counted, not timed, so a render is refused on every machine alike:

* one step for every node rendered and for every ``{% for %}`` iteration (an empty
  loop body still costs its iterations); at most ``MAILROOM_TEMPLATE_MAX_STEPS``;
* the text that nodes add (text, variables, simple tags) as it is produced, and the
  final output in UTF-8 bytes; at most ``MAILROOM_TEMPLATE_MAX_OUTPUT_BYTES``, which
  also caps every string a filter returns (so ``{% with %}`` cannot double a value
  into gigabytes without printing it);
* at most MAX_DEPTH nested includes and extends.

Every failure is an ``EmailTemplateError`` (a ValueError) with a message fit for the
caller: a syntax error, an unknown template, a limit, or a context the template cannot
render. This module is the bottom layer: it imports Django and the standard library only.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import posixpath
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

from django.conf import settings
from django.template import (
    Context,
    Engine,
    Library,
    Origin,
    Template,
    TemplateDoesNotExist,
    TemplateSyntaxError,
    defaultfilters,
    defaulttags,
    loader_tags,
)
from django.template.base import FilterExpression, Lexer, Node, NodeList, Parser, Token
from django.template.defaulttags import (
    AutoEscapeControlNode,
    FilterNode,
    ForNode,
    IfChangedNode,
    IfNode,
    SpacelessNode,
    WithNode,
)
from django.template.loader_tags import BlockNode, ExtendsNode, IncludeNode
from django.template.loaders.base import Loader
from django.utils.safestring import SafeString

logger = logging.getLogger(__name__)

DEFAULT_MAX_STEPS = 20_000
DEFAULT_MAX_OUTPUT_BYTES = 1024 * 1024
MAX_DEPTH = 10  # includes and extends inside one another
MAX_DECIMAL_PLACES = 30  # floatformat: its precision would otherwise be unbounded

# Templates that only lay out others ({% extends %}); they are never sent on their own.
LAYOUT_TEMPLATES = frozenset({"base"})

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
# emails/<name> or emails/<folder>/<name>: no "..", no absolute path, nothing else.
_EMAIL_NAME = re.compile(r"emails/(?:[A-Za-z0-9_][A-Za-z0-9_.-]*/)*[A-Za-z0-9_][A-Za-z0-9_.-]*")

ALLOWED_TAGS = (
    "autoescape",
    "comment",
    "cycle",
    "filter",
    "firstof",
    "for",
    "if",
    "ifchanged",
    "now",
    "regroup",
    "resetcycle",
    "spaceless",
    "templatetag",
    "verbatim",
    "with",
)
ALLOWED_FILTERS = (
    "add",
    "capfirst",
    "cut",
    "date",
    "default",
    "default_if_none",
    "dictsort",
    "dictsortreversed",
    "divisibleby",
    "escape",
    "escapeseq",
    "filesizeformat",
    "first",
    "floatformat",
    "force_escape",
    "get_digit",
    "iriencode",
    "join",
    "last",
    "length",
    "linebreaks",
    "linebreaksbr",
    "lower",
    "pluralize",
    "random",
    "safe",
    "safeseq",
    "slice",
    "slugify",
    "striptags",
    "time",
    "title",
    "truncatechars",
    "truncatechars_html",
    "truncatewords",
    "truncatewords_html",
    "upper",
    "urlencode",
    "urlize",
    "wordcount",
    "wordwrap",
    "yesno",
)


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


class EmailTemplateError(ValueError):
    """A template or subject that cannot be rendered; the message is for the caller."""


class EmailTemplateSyntaxError(EmailTemplateError, TemplateSyntaxError):
    """Broken syntax, or a tag or filter outside the allow-list (Django's message)."""


class UnknownEmailTemplate(EmailTemplateError, TemplateDoesNotExist):
    """A name that is not an email template: missing, or outside ``emails/``."""

    def __init__(self, name: object) -> None:
        # args[0] stays the name: Django's select_template joins the names it tried.
        super().__init__(str(name))
        self.name = name

    def __str__(self) -> str:
        return f"unknown template {self.name!r}: only email templates (emails/...) can be used"


class TemplateLimitExceeded(EmailTemplateError):
    """A render that needed more steps, output or nesting than allowed."""


class EmailTemplateRenderError(EmailTemplateError):
    """The template ran into a value it cannot handle (a number where it loops, say)."""


# --------------------------------------------------------------------------------------
# The budget of one render
# --------------------------------------------------------------------------------------


class _Budget:
    """What one top-level render may still spend. A refusal is remembered: Django
    swallows exceptions in some places (an ``{% if %}`` comparison), and the render
    must fail all the same."""

    def __init__(self, max_steps: int, max_output: int) -> None:
        self.max_steps = max_steps
        self.max_output = max_output
        self.steps = 0
        self.output = 0
        self.depth = 0
        self.exceeded: TemplateLimitExceeded | None = None

    @classmethod
    def from_settings(cls) -> _Budget:
        return cls(
            getattr(settings, "MAILROOM_TEMPLATE_MAX_STEPS", DEFAULT_MAX_STEPS),
            getattr(settings, "MAILROOM_TEMPLATE_MAX_OUTPUT_BYTES", DEFAULT_MAX_OUTPUT_BYTES),
        )

    def step(self) -> None:
        self.steps += 1
        if self.steps > self.max_steps:
            self.refuse(f"template work limit exceeded (more than {self.max_steps} steps)")

    def grow(self, size: int) -> None:
        self.output += size
        if self.output > self.max_output:
            self.refuse(f"template output limit exceeded (more than {self.max_output} bytes)")

    def check_value(self, size: int) -> None:
        """A string a filter made (or is about to make) must fit in the output."""
        if size > self.max_output:
            self.refuse(
                f"template output limit exceeded (a value of more than {self.max_output} bytes)"
            )

    @contextlib.contextmanager
    def nested(self) -> Iterator[None]:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                self.refuse(
                    f"template nesting limit exceeded (more than {MAX_DEPTH} levels of "
                    "include and extends)"
                )
            yield
        finally:
            self.depth -= 1

    def finish(self, output: str) -> None:
        """The exact check at the end: UTF-8 bytes (while rendering, characters)."""
        if self.exceeded is not None:
            raise self.exceeded
        if len(output) * 4 > self.max_output:
            self.output = 0
            self.grow(len(output.encode("utf-8", "replace")))

    def refuse(self, message: str) -> None:
        if self.exceeded is None:
            self.exceeded = TemplateLimitExceeded(message)
        raise self.exceeded


# The budget of the render under way in this thread (or task); None between renders.
_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "mailroom_template_budget", default=None
)


# --------------------------------------------------------------------------------------
# Counting: every node the parser makes is metered
# --------------------------------------------------------------------------------------

# Nodes whose output is their children's, already counted when the children rendered.
_COMPOSITE_NODES = (
    AutoEscapeControlNode,
    BlockNode,
    ExtendsNode,
    FilterNode,
    ForNode,
    IfChangedNode,
    IfNode,
    IncludeNode,
    SpacelessNode,
    WithNode,
)


class _MeteredParser(Parser):
    """Django's parser, metering each node it adds (nested tag bodies included: tags
    parse their bodies with the same parser)."""

    def extend_nodelist(self, nodelist: NodeList, node: Node, token: Token) -> None:
        super().extend_nodelist(nodelist, node, token)
        _meter(node)


def _meter(node: Node) -> None:
    """Charge a step per render of ``node`` and count the text it adds."""
    render = node.render_annotated
    counts_output = not isinstance(node, _COMPOSITE_NODES)
    nests = isinstance(node, IncludeNode | ExtendsNode)
    if isinstance(node, ForNode):
        node.sequence = _ChargedSequence(cast(FilterExpression, node.sequence))  # type: ignore[assignment]

    def render_metered(context: Context) -> str:
        budget = _BUDGET.get()
        if budget is None:
            # Only {% verbatim %} renders at parse time, and its body is plain text.
            return cast(str, render(context))
        budget.step()
        if nests:
            with budget.nested():
                output = cast(str, render(context))
        else:
            output = cast(str, render(context))
        if counts_output:
            budget.grow(len(output))
        return output

    node.render_annotated = render_metered  # type: ignore[method-assign]


class _ChargedSequence:
    """A ``{% for %}`` sequence that charges a step for every item it hands out."""

    def __init__(self, sequence: FilterExpression) -> None:
        self.sequence = sequence

    def resolve(self, context: Context, ignore_failures: bool = False) -> object:
        values = self.sequence.resolve(context, ignore_failures=ignore_failures)
        return None if values is None else _ChargedItems(values)

    def __str__(self) -> str:
        return str(self.sequence)


class _ChargedItems:
    def __init__(self, values: Any) -> None:
        # As ForNode does: something without a length is made a list (and an int fails).
        self.values = values if hasattr(values, "__len__") else list(values)

    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self) -> Iterator[Any]:
        return self._charged(iter(self.values))

    def __reversed__(self) -> Iterator[Any]:
        return self._charged(reversed(self.values))

    @staticmethod
    def _charged(items: Iterator[Any]) -> Iterator[Any]:
        budget = _BUDGET.get()
        for item in items:
            if budget is not None:
                budget.step()
            yield item


# --------------------------------------------------------------------------------------
# Names: include and extends reach email templates only
# --------------------------------------------------------------------------------------


def _check_reference(name: str, origin_name: str | None) -> None:
    """Refuse a template name outside ``emails/`` (relative names resolve against the
    including template, as Django does; a subject has no place to resolve from)."""
    target = name
    if name.startswith(("./", "../")):
        if origin_name is None:
            raise UnknownEmailTemplate(name)
        target = posixpath.normpath(posixpath.join(posixpath.dirname(origin_name), name))
    if ".." in target or not _EMAIL_NAME.fullmatch(target):
        raise UnknownEmailTemplate(name)


class _ConfinedName:
    """The name expression of an include or extends, checked when it resolves."""

    def __init__(self, name: FilterExpression, origin_name: str | None) -> None:
        self.name = name
        self.origin_name = origin_name
        self.token = name.token  # ExtendsNode's repr shows it

    def resolve(self, context: Context, ignore_failures: bool = False) -> object:
        value = self.name.resolve(context, ignore_failures=ignore_failures)
        if isinstance(value, str):
            _check_reference(value, self.origin_name)
        return value

    def __repr__(self) -> str:
        return repr(self.name)


CompileFunction = Callable[[Parser, Token], Node]


def _confined(compile_function: CompileFunction, attribute: str) -> CompileFunction:
    """Django's include or extends, with its template name confined to ``emails/``."""

    def compile_confined(parser: Parser, token: Token) -> Node:
        origin_name = _origin_name(parser.origin)
        bits = token.split_contents()
        # Django resolves "./x" against the template's own name, which a string has not
        # (it would fail with an AttributeError): refuse it here, cleanly.
        if len(bits) > 1 and origin_name is None:
            _check_relative(bits[1].strip("'\""))
        node = compile_function(parser, token)
        name: FilterExpression = getattr(node, attribute)
        if isinstance(name.var, str) and not name.filters:
            _check_reference(str(name.var), origin_name)  # a literal: refused when parsed
        setattr(node, attribute, _ConfinedName(name, origin_name))
        return node

    return compile_confined


def _origin_name(origin: Origin | None) -> str | None:
    """The name a template was loaded by; None for a string (a subject)."""
    name = origin.template_name if origin is not None else None
    return name if isinstance(name, str) else None


def _check_relative(name: str) -> None:
    if name.startswith(("./", "../")):
        raise UnknownEmailTemplate(name)


# --------------------------------------------------------------------------------------
# Filters: every string they return is counted against the output limit
# --------------------------------------------------------------------------------------

FilterFunction = Callable[..., Any]


def _checked(function: FilterFunction, guard: FilterFunction | None = None) -> FilterFunction:
    """``function`` refusing a string result larger than the output limit, after an
    optional ``guard`` that refuses arguments before the work is done."""

    @functools.wraps(function)  # keeps is_safe, needs_autoescape and the signature
    def checked(value: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        if budget is not None and guard is not None:
            guard(budget, value, *args)
        result = function(value, *args, **kwargs)
        if budget is not None and isinstance(result, str):
            budget.check_value(len(result))
        return result

    return checked


def _join_guard(budget: _Budget, value: Any, arg: Any = "") -> None:
    """A separator is repeated between every two items: count it before joining."""
    if hasattr(value, "__len__"):
        budget.check_value(len(str(arg)) * max(len(value) - 1, 0))


def _floatformat_guard(budget: _Budget, value: Any, arg: Any = -1) -> None:
    """floatformat computes as many decimal places as asked for."""
    digits = arg.rstrip("gu") if isinstance(arg, str) else arg
    try:
        places = abs(int(digits or -1))
    except (TypeError, ValueError):
        return  # floatformat shows the value unchanged
    if places > MAX_DECIMAL_PLACES:
        budget.refuse(
            f"template limit exceeded: floatformat shows at most {MAX_DECIMAL_PLACES} "
            "decimal places"
        )


_GUARDS: Mapping[str, FilterFunction] = {"join": _join_guard, "floatformat": _floatformat_guard}


def _library() -> Library:
    """The only tags and filters email templates know (``{% load %}`` is not one)."""
    library = Library()
    for name in ALLOWED_TAGS:
        library.tag(name, defaulttags.register.tags[name])
    library.tag("block", loader_tags.register.tags["block"])
    library.tag("extends", _confined(loader_tags.register.tags["extends"], "parent_name"))
    library.tag("include", _confined(loader_tags.register.tags["include"], "template"))
    for name in ALLOWED_FILTERS:
        library.filter(name, _checked(defaultfilters.register.filters[name], _GUARDS.get(name)))
    return library


# --------------------------------------------------------------------------------------
# Templates, the loader and the engine
# --------------------------------------------------------------------------------------


class EmailTemplate(Template):
    """A template parsed with metering; rendering it on its own starts a budget."""

    def compile_nodelist(self) -> NodeList:
        tokens = Lexer(self.source).tokenize()
        parser = _MeteredParser(
            tokens, self.engine.template_libraries, self.engine.template_builtins, self.origin
        )
        nodelist = parser.parse()
        self.extra_data = parser.extra_data  # type: ignore[attr-defined]
        return nodelist

    def render(self, context: Context) -> SafeString:
        if _BUDGET.get() is not None:
            return super().render(context)  # an include, inside a render under way
        budget = _Budget.from_settings()
        token = _BUDGET.set(budget)
        try:
            output = super().render(context)
        except Exception as exc:
            if budget.exceeded is not None:
                raise budget.exceeded from exc  # whatever broke, the limit broke first
            raise
        finally:
            _BUDGET.reset(token)
        budget.finish(output)
        return output


class _EmailLoader(Loader):
    """Email templates only: ``emails/...`` under this app's templates directory,
    compiled once (as Django's cached loader does)."""

    def __init__(self, engine: Engine, root: Path) -> None:
        super().__init__(engine)
        self.root = root
        self.emails = root / "emails"
        self._compiled: dict[str, EmailTemplate] = {}

    def get_template_sources(self, template_name: str) -> Iterator[Origin]:
        if not isinstance(template_name, str) or ".." in template_name:
            return
        if not _EMAIL_NAME.fullmatch(template_name):
            return
        path = (self.root / template_name).resolve()
        if path.is_relative_to(self.emails):  # not a symlink out of emails/
            yield Origin(name=str(path), template_name=template_name, loader=self)

    def get_contents(self, origin: Origin) -> str:
        try:
            return Path(origin.name).read_text(encoding=self.engine.file_charset)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise TemplateDoesNotExist(origin) from None

    def get_template(self, template_name: str, skip: list[Origin] | None = None) -> Template:
        template = self._compiled.get(template_name) if isinstance(template_name, str) else None
        if template is None:
            template = self._compile(template_name)
        if skip and template.origin in skip:
            raise UnknownEmailTemplate(template_name)  # extends of itself
        return template

    def _compile(self, template_name: str) -> EmailTemplate:
        for origin in self.get_template_sources(template_name):
            try:
                contents = self.get_contents(origin)
            except TemplateDoesNotExist:
                break
            template = EmailTemplate(contents, origin, template_name, self.engine)
            self._compiled[template_name] = template
            return template
        raise UnknownEmailTemplate(template_name)

    def reset(self) -> None:
        self._compiled.clear()


class _EmailEngine(Engine):
    """Not the project's engine: no app directories, no context processors, no
    libraries, and as builtins our library alone (Engine adds Django's otherwise)."""

    default_builtins: list[str] = []

    def __init__(self, root: Path) -> None:
        self.root = root
        super().__init__(
            dirs=[],
            app_dirs=False,
            context_processors=[],
            debug=False,
            loaders=[],
            libraries={},
            builtins=[],
            autoescape=True,
        )

    def get_template_builtins(self, builtins: list[str]) -> list[Library]:
        return [_LIBRARY]

    def get_template_loaders(self, template_loaders: Any) -> list[Loader]:
        return [_EmailLoader(self, self.root)]

    def find_template(
        self, name: str, dirs: None = None, skip: list[Origin] | None = None
    ) -> tuple[Template, Origin]:
        template = self.template_loaders[0].get_template(name, skip=skip)
        return template, template.origin

    def from_string(self, template_code: str) -> Template:
        return EmailTemplate(template_code, engine=self)


_LIBRARY = _library()


@functools.cache
def engine() -> Engine:
    """The one email engine of this process."""
    return _EmailEngine(TEMPLATES_DIR)


# --------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------


def get_template(name: str) -> Template:
    """The email template ``name`` (``emails/welcome.html``), compiled.

    Raises UnknownEmailTemplate or EmailTemplateSyntaxError."""
    with _clean_errors():
        return engine().get_template(name)


def find_template(name: str) -> Template | None:
    """``get_template``, or None when there is no such template (an optional part)."""
    try:
        return get_template(name)
    except UnknownEmailTemplate:
        return None


def from_string(source: str) -> Template:
    """A template from the caller (a subject), compiled. Raises EmailTemplateSyntaxError."""
    with _clean_errors():
        return engine().from_string(source)


def render(template: Template, context: Mapping[str, Any], *, autoescape: bool = True) -> str:
    """``template`` rendered for ``context`` within the limits; raises EmailTemplateError.

    The context is copied one level deep, so ``{% now "Y" as year %}`` and the like
    cannot change the caller's dict."""
    with _clean_errors():
        return str(template.render(Context(dict(context), autoescape=autoescape)))


@contextlib.contextmanager
def _clean_errors() -> Iterator[None]:
    """Django's and Python's errors as EmailTemplateErrors with a message for the caller."""
    try:
        yield
    except EmailTemplateError:
        raise
    except TemplateSyntaxError as exc:
        raise EmailTemplateSyntaxError(str(exc)) from exc
    except TemplateDoesNotExist as exc:
        # select_template (an include of a list of names) names them joined.
        raise UnknownEmailTemplate(exc.args[0] if exc.args else "") from exc
    except (TypeError, ValueError, LookupError, ArithmeticError) as exc:
        # A context that does not fit: "'int' object is not iterable" tells the caller why.
        raise EmailTemplateRenderError(f"the context does not fit the template: {exc}") from exc
    except AttributeError as exc:
        # Says more about Python than about the template: logged, not shown.
        logger.info("template render failed: %r", exc)
        raise EmailTemplateRenderError(
            "the context does not fit the template (a value of the wrong kind)"
        ) from exc
