"""The shipped mail templates: every one renders in every language, strictly."""

from __future__ import annotations

from typing import Any

import pytest

from app.errors import PermanentError
from app.mail import LOCALES, Templates

# The context each shipped template needs, as README documents it.
CONTEXTS: dict[str, dict[str, Any]] = {
    "checkup_completed": {
        "patient_name": "Анна",
        "checkup_date": "27.11.2026",
        "doctor_name": "Dr. Smith",
        "results_url": "https://example.com/results/1",
    },
    "report_ready": {
        "title": "Payments",
        "period": "2026-11-01 – 2026-11-30",
        "columns": ["currency", "total"],
        "rows": [["USD", "10.00"]],
        "row_count": 1,
        "truncated": False,
        "filename": "payments.csv",
    },
    "payment_receipt": {
        "payment_id": "pay_1",
        "amount": "1234.50",
        "currency": "RUB",
        "provider": "stripe",
        "paid_at": "2026-11-27T21:32:00+03:00",
    },
}


@pytest.fixture(scope="module")
def templates() -> Templates:
    return Templates()


def test_the_three_templates_ship_in_both_languages(templates: Templates) -> None:
    assert templates.names == sorted(CONTEXTS)
    assert LOCALES == ("en", "ru")


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("name", sorted(CONTEXTS))
def test_each_template_renders_subject_html_and_text(
    templates: Templates, name: str, locale: str
) -> None:
    rendered = templates.render(name, locale, CONTEXTS[name])
    assert rendered.subject and "\n" not in rendered.subject
    assert rendered.html.startswith("<!DOCTYPE html>")
    assert f'<html lang="{locale}">' in rendered.html
    assert "{{" not in rendered.html + rendered.text
    # The shared layout's footer, in the mail's language.
    footer = "автоматическое письмо" if locale == "ru" else "automated message"
    assert footer in rendered.html and footer in rendered.text


def test_language_changes_the_words(templates: Templates) -> None:
    en = templates.render("payment_receipt", "en", CONTEXTS["payment_receipt"])
    ru = templates.render("payment_receipt", "ru", CONTEXTS["payment_receipt"])
    assert en.subject == "Payment receipt: RUB\u00a01,234.50"
    assert ru.subject == "Квитанция об оплате на сумму 1\u00a0234,50\u00a0₽"
    # paid_at shown in UTC, in the locale's one date format
    assert "Nov 27, 2026, 6:32\u202fPM UTC" in en.text
    assert "27.11.2026, 18:32 UTC" in ru.text


def test_a_missing_variable_is_named(templates: Templates) -> None:
    context = dict(CONTEXTS["checkup_completed"])
    del context["doctor_name"]
    with pytest.raises(PermanentError, match="'doctor_name' is undefined"):
        templates.render("checkup_completed", "en", context)


def test_an_unknown_template_is_named_with_the_known_ones(templates: Templates) -> None:
    with pytest.raises(PermanentError, match="unknown template 'welcome'; known: checkup_"):
        templates.render("welcome", "en", {})


def test_html_is_escaped_and_text_is_not(templates: Templates) -> None:
    context = {**CONTEXTS["checkup_completed"], "patient_name": "<b>Tom & Jerry</b>"}
    rendered = templates.render("checkup_completed", "en", context)
    assert "&lt;b&gt;Tom &amp; Jerry&lt;/b&gt;" in rendered.html
    assert "<b>Tom" not in rendered.html
    assert "Hello, <b>Tom & Jerry</b>!" in rendered.text


def test_line_breaks_in_variables_never_reach_the_subject(templates: Templates) -> None:
    for char in ("\r\n", "\x0b", "\x1e", "\u2028"):
        context = {**CONTEXTS["report_ready"], "title": f"Q4{char}Bcc: victim@example.com"}
        with pytest.raises(PermanentError, match="^context.title: must not contain line breaks"):
            templates.render("report_ready", "en", context)


def test_amounts_are_shown_exactly(templates: Templates) -> None:
    context = {**CONTEXTS["payment_receipt"], "amount": "1000000.005", "currency": "BHD"}
    rendered = templates.render("payment_receipt", "en", context)
    assert "BHD\u00a01,000,000.005" in rendered.text
