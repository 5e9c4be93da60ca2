"""The mail templates: compiled once, rendered strictly, numbers and dates formatted by Babel.

Templates live in `app/templates/email/<locale>/<name>.html` and `.txt`, sharing the
layouts `base.html` and `base.txt`; the `.txt` file's `subject` block is the subject.
They are compiled once at start into one Jinja2 environment with strict undefined
variables: a missing variable is an error that names it, never an empty gap in a mail.
HTML is autoescaped, plain text is not.

Numbers and dates are formatted by Babel with the locale's own conventions (CLDR), one
date format per locale (`DATE_FORMATS`):

    {{ amount | money(currency) }}   1,234.50 / RUB 1,234.50 (en), 1 234,50 ₽ (ru); every digit kept
    {{ count | number }}             1,234 (en), 1 234 (ru)
    {{ day | date }}                 Nov 27, 2026 (en), 27.11.2026 (ru)
    {{ moment | datetime }}          Nov 27, 2026, 6:32 PM UTC (en), 27.11.2026, 18:32 UTC (ru)

Every value a filter formats is bounded before it is parsed or formatted (`MAX_INTEGER_DIGITS`,
`MAX_FRACTION_DIGITS`, `MAX_VALUE_CHARS`), so no value costs more than a few microseconds:
`1E+30000000` as an amount would be thirty million digits. The variables each template
passes through a filter are found in its syntax tree at start, so `check()` names the
context field that is out of bounds before anything is rendered.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import jinja2
import jinja2.nodes
from babel.dates import format_date as babel_date
from babel.dates import format_time as babel_time
from babel.numbers import format_currency, format_decimal

from app.errors import PermanentError
from app.mime import unsafe_character

LOCALES = ("en", "ru")
TEMPLATES_DIR = Path(__file__).with_name("templates") / "email"
# One date format per locale (Babel's names for CLDR's patterns): `Nov 27, 2026`, `27.11.2026`.
DATE_FORMATS = {"en": "medium", "ru": "short"}
MAX_INTEGER_DIGITS = 24
MAX_FRACTION_DIGITS = 18
# A number, date or currency as text is never longer than this.
MAX_VALUE_CHARS = 64
MAX_SUBJECT_CHARS = 998
_CURRENCY = re.compile(r"[A-Z]{3}")
_DMY = re.compile(r"([0-9]{2})\.([0-9]{2})\.([0-9]{4})")
# CLDR's currency spacing, which Babel leaves out: `RUB1,234.50` -> `RUB 1,234.50`.
_LETTER_DIGIT = re.compile(r"(?<=[^\W\d_])(?=\d)|(?<=\d)(?=[^\W\d_])")


class ValueOutOfBounds(ValueError):
    """A value a template formats is not what its filter takes; the message says why."""


def _text(value: object, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
        raise ValueOutOfBounds(f"must be {what}")
    text = str(value)
    if len(text) > MAX_VALUE_CHARS:
        raise ValueOutOfBounds(f"must be {what} of at most {MAX_VALUE_CHARS} characters")
    return text


def parse_decimal(value: object) -> Decimal:
    """`value` as a Decimal with at most MAX_INTEGER_DIGITS and MAX_FRACTION_DIGITS digits."""
    text = _text(value, "a decimal number")
    try:
        number = Decimal(text.strip())
    except InvalidOperation:
        raise ValueOutOfBounds("must be a decimal number") from None
    if not number.is_finite():
        raise ValueOutOfBounds("must be a finite decimal number")
    exponent = number.as_tuple().exponent
    assert isinstance(exponent, int)  # finite
    integer_digits = max(number.adjusted() + 1, 1)
    fraction_digits = max(-exponent, 0)
    if integer_digits > MAX_INTEGER_DIGITS or fraction_digits > MAX_FRACTION_DIGITS:
        raise ValueOutOfBounds(
            f"must have at most {MAX_INTEGER_DIGITS} digits before the decimal point and "
            f"{MAX_FRACTION_DIGITS} after it"
        )
    return number


def parse_currency(value: object) -> str:
    if not isinstance(value, str) or not _CURRENCY.fullmatch(value):
        raise ValueOutOfBounds("must be a currency code of three capital letters, like EUR")
    return value


def parse_date(value: object) -> date:
    """An ISO 8601 date or timestamp (its UTC day), or `DD.MM.YYYY`."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).date() if value.tzinfo else value.date()
    if isinstance(value, date):
        return value
    text = _text(value, "a date (YYYY-MM-DD)").strip()
    try:
        found = _DMY.fullmatch(text)
        if found is not None:
            return date(int(found[3]), int(found[2]), int(found[1]))
        if len(text) <= 10:
            return date.fromisoformat(text)
        return parse_datetime(text).date()
    except ValueError:
        raise ValueOutOfBounds("must be a date (YYYY-MM-DD)") from None


def parse_datetime(value: object) -> datetime:
    """An ISO 8601 timestamp, in UTC (one without an offset is taken as UTC)."""
    if isinstance(value, datetime):
        moment = value
    else:
        text = _text(value, "an ISO 8601 timestamp").strip()
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ValueOutOfBounds("must be an ISO 8601 timestamp") from None
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def format_money(value: object, currency: object, locale: str) -> str:
    """An amount in `currency`, every digit given kept (at least the currency's decimals)."""
    text = format_currency(
        parse_decimal(value), parse_currency(currency), locale=locale, decimal_quantization=False
    )
    return _LETTER_DIGIT.sub("\u00a0", text)


def format_number(value: object, locale: str) -> str:
    return format_decimal(parse_decimal(value), locale=locale, decimal_quantization=False)


def format_amount(value: object, locale: str) -> str:
    """An amount without its currency: at least two decimals, every digit given kept."""
    return format_decimal(
        parse_decimal(value), format="#,##0.00", locale=locale, decimal_quantization=False
    )


def format_day(value: object, locale: str) -> str:
    """A date in the locale's one date format."""
    return babel_date(parse_date(value), DATE_FORMATS[locale], locale=locale)


def format_moment(value: object, locale: str) -> str:
    """A timestamp as the locale's date and short time, in UTC."""
    moment = parse_datetime(value)
    time = babel_time(moment.timetz(), "short", tzinfo=UTC, locale=locale)
    return f"{format_day(moment, locale)}, {time} UTC"


# Filter -> how it checks its input (and, for `money`, its currency argument).
_CHECKS: dict[str, Callable[[object], object]] = {
    "money": parse_decimal,
    "number": parse_decimal,
    "date": parse_date,
    "datetime": parse_datetime,
}


def _typed_variables(environment: jinja2.Environment, source: str) -> dict[str, Callable[..., Any]]:
    """The context variables a template formats with a filter, each with its check."""
    found: dict[str, Callable[..., Any]] = {}
    for node in environment.parse(source).find_all(jinja2.nodes.Filter):
        check = _CHECKS.get(node.name)
        if check is not None and isinstance(node.node, jinja2.nodes.Name):
            found[node.node.name] = check
        if node.name == "money" and node.args and isinstance(node.args[0], jinja2.nodes.Name):
            found[node.args[0].name] = parse_currency
    return found


@jinja2.pass_context
def _money(context: jinja2.runtime.Context, value: object, currency: object) -> str:
    return format_money(value, currency, context["locale"])


@jinja2.pass_context
def _number(context: jinja2.runtime.Context, value: object) -> str:
    return format_number(value, context["locale"])


@jinja2.pass_context
def _date(context: jinja2.runtime.Context, value: object) -> str:
    return format_day(value, context["locale"])


@jinja2.pass_context
def _datetime(context: jinja2.runtime.Context, value: object) -> str:
    return format_moment(value, context["locale"])


@dataclass(frozen=True)
class Rendered:
    """A template rendered for one mail."""

    subject: str
    html: str
    text: str


class Templates:
    """The mail templates, compiled once; `render()` is thread-safe."""

    def __init__(self, directory: Path = TEMPLATES_DIR) -> None:
        self._env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(directory),
            autoescape=jinja2.select_autoescape(["html"]),
            undefined=jinja2.StrictUndefined,
            auto_reload=False,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._env.filters.update(money=_money, number=_number, date=_date, datetime=_datetime)
        self._compiled: dict[tuple[str, str], tuple[jinja2.Template, jinja2.Template]] = {}
        self._typed: dict[str, dict[str, Callable[..., Any]]] = {}
        for locale in LOCALES:
            for path in sorted((directory / locale).glob("*.html")):
                html = self._env.get_template(f"{locale}/{path.name}")
                text = self._env.get_template(f"{locale}/{path.stem}.txt")
                if "subject" not in text.blocks:
                    raise RuntimeError(f"template {locale}/{path.stem}.txt has no subject block")
                self._compiled[(path.stem, locale)] = (html, text)
                typed = self._typed.setdefault(path.stem, {})
                for source in (path, path.with_suffix(".txt")):
                    typed.update(_typed_variables(self._env, source.read_text("utf-8")))
        for name in self.names:
            missing = [loc for loc in LOCALES if (name, loc) not in self._compiled]
            if missing:
                raise RuntimeError(f"template {name!r} is missing locale(s) {missing}")
        # Babel loads a locale's data on first use: at start, not in the first job.
        for locale in LOCALES:
            format_money("1", "EUR", locale)
            format_moment("2026-01-01T00:00:00+00:00", locale)

    @property
    def names(self) -> list[str]:
        return sorted({name for name, _ in self._compiled})

    def check(self, name: str, locale: str, context: Mapping[str, Any]) -> None:
        """PermanentError naming the template, locale or context field that cannot render."""
        if (name, locale) not in self._compiled:
            if name not in self.names:
                raise PermanentError(f"unknown template {name!r}; known: {', '.join(self.names)}")
            raise PermanentError(f"template {name!r} has no locale {locale!r}")
        for variable, check in self._typed[name].items():
            if variable in context:
                try:
                    check(context[variable])
                except ValueOutOfBounds as error:
                    raise PermanentError(f"context.{variable}: {error}") from None

    def render(self, name: str, locale: str, context: Mapping[str, Any]) -> Rendered:
        """Renders template `name` in `locale`; PermanentError names what is wrong."""
        self.check(name, locale, context)
        html, text = self._compiled[(name, locale)]
        variables = {**context, "locale": locale}
        try:
            subject = "".join(text.blocks["subject"](text.new_context(variables))).strip()
            rendered = Rendered(
                subject=subject,
                html=html.render(variables),
                text=text.render(variables).strip() + "\n",
            )
        except jinja2.UndefinedError as error:
            raise PermanentError(
                f"template {name!r} ({locale}): {error.message or 'undefined variable'}"
            ) from None
        except (jinja2.TemplateError, TypeError, ValueError) as error:
            raise PermanentError(f"template {name!r} ({locale}) failed: {error}") from None
        if not rendered.subject:
            raise PermanentError(f"template {name!r} ({locale}) rendered an empty subject")
        if unsafe_character(rendered.subject) is not None:
            raise PermanentError(_unsafe_subject(name, context))
        if len(rendered.subject) > MAX_SUBJECT_CHARS:
            raise PermanentError(
                f"template {name!r} ({locale}) rendered a subject longer than "
                f"{MAX_SUBJECT_CHARS} characters"
            )
        return rendered


def _unsafe_subject(name: str, context: Mapping[str, Any]) -> str:
    """Names the context variables that brought a control character into the subject."""
    culprits = [
        f"context.{key}"
        for key, value in context.items()
        if isinstance(value, str) and unsafe_character(value) is not None
    ]
    where = ", ".join(culprits) or f"the subject of template {name!r}"
    return (
        f"{where}: must not contain line breaks or control characters "
        f"(it reaches the subject of template {name!r})"
    )
