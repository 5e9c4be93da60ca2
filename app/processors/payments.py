"""The payments_queue processor: a provider payment event becomes a payment's state.

```json
{"provider": "stripe", "event_id": "evt_1", "payment_id": "pi_1", "status": "succeeded",
 "amount": "12.50", "currency": "EUR", "customer_email": "anna@example.com",
 "metadata": {"locale": "ru", "order": "A-17"}}
```

The event is validated here (money as `Decimal` from a decimal string, never a
float; a real ISO 4217 code; no more decimals than the currency has) and applied
by one RPC, `queue_worker.apply_payment_event` (supabase/migrations), in one
transaction: recorded once per (provider, event_id), the payment moved forward
only, and the `payment_receipt` email job enqueued on the payment's first
`succeeded`. Running a job twice is therefore harmless: the second run is a
duplicate that changes nothing.
"""

from __future__ import annotations

import json
import logging
from decimal import Decimal
from types import MappingProxyType
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    EmailStr,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)

# Duplicates are counted here, not by the runner: only the RPC's answer says
# whether an event was applied, a duplicate or stale.
from app import metrics
from app.errors import PermanentError, RetryableError
from app.jobs import Resources
from app.processors import parse_body, parse_job
from app.queue.backend import RpcCaller
from app.queue.models import QueueMessage
from app.queue.rpc import RpcError

log = logging.getLogger(__name__)

FUNCTION: Final = "apply_payment_event"
MIGRATION: Final = "supabase/migrations/20261127000100_payments.sql"
RESULTS: Final = ("applied", "duplicate", "stale")
MAX_METADATA_BYTES: Final = 16_384
# numeric(20, 6) in the tables: 14 digits before the point, 6 after.
MAX_INTEGER_DIGITS: Final = 14

# ISO 4217 List One, the currencies with minor units (SIX, published 2026-01-01):
# code -> digits after the decimal point. Funds and units without a minor unit
# ("N.A.": XAU, XAG, XPD, XPT, XDR, XSU, XUA, XBA-XBD, XTS, XXX) are not
# currencies a customer pays in and are refused. Withdrawn codes (ANG, BGN, CUC,
# HRK, SLL, VEF, ZWL, ...) are refused too.
CURRENCY_MINOR_UNITS: Final = MappingProxyType(
    {
        "AED": 2, "AFN": 2, "ALL": 2, "AMD": 2, "AOA": 2, "ARS": 2, "AUD": 2, "AWG": 2,
        "AZN": 2, "BAM": 2, "BBD": 2, "BDT": 2, "BHD": 3, "BIF": 0, "BMD": 2, "BND": 2,
        "BOB": 2, "BOV": 2, "BRL": 2, "BSD": 2, "BTN": 2, "BWP": 2, "BYN": 2, "BZD": 2,
        "CAD": 2, "CDF": 2, "CHE": 2, "CHF": 2, "CHW": 2, "CLF": 4, "CLP": 0, "CNY": 2,
        "COP": 2, "COU": 2, "CRC": 2, "CUP": 2, "CVE": 2, "CZK": 2, "DJF": 0, "DKK": 2,
        "DOP": 2, "DZD": 2, "EGP": 2, "ERN": 2, "ETB": 2, "EUR": 2, "FJD": 2, "FKP": 2,
        "GBP": 2, "GEL": 2, "GHS": 2, "GIP": 2, "GMD": 2, "GNF": 0, "GTQ": 2, "GYD": 2,
        "HKD": 2, "HNL": 2, "HTG": 2, "HUF": 2, "IDR": 2, "ILS": 2, "INR": 2, "IQD": 3,
        "IRR": 2, "ISK": 0, "JMD": 2, "JOD": 3, "JPY": 0, "KES": 2, "KGS": 2, "KHR": 2,
        "KMF": 0, "KPW": 2, "KRW": 0, "KWD": 3, "KYD": 2, "KZT": 2, "LAK": 2, "LBP": 2,
        "LKR": 2, "LRD": 2, "LSL": 2, "LYD": 3, "MAD": 2, "MDL": 2, "MGA": 2, "MKD": 2,
        "MMK": 2, "MNT": 2, "MOP": 2, "MRU": 2, "MUR": 2, "MVR": 2, "MWK": 2, "MXN": 2,
        "MXV": 2, "MYR": 2, "MZN": 2, "NAD": 2, "NGN": 2, "NIO": 2, "NOK": 2, "NPR": 2,
        "NZD": 2, "OMR": 3, "PAB": 2, "PEN": 2, "PGK": 2, "PHP": 2, "PKR": 2, "PLN": 2,
        "PYG": 0, "QAR": 2, "RON": 2, "RSD": 2, "RUB": 2, "RWF": 0, "SAR": 2, "SBD": 2,
        "SCR": 2, "SDG": 2, "SEK": 2, "SGD": 2, "SHP": 2, "SLE": 2, "SOS": 2, "SRD": 2,
        "SSP": 2, "STN": 2, "SVC": 2, "SYP": 2, "SZL": 2, "THB": 2, "TJS": 2, "TMT": 2,
        "TND": 3, "TOP": 2, "TRY": 2, "TTD": 2, "TWD": 2, "TZS": 2, "UAH": 2, "UGX": 0,
        "USD": 2, "USN": 2, "UYI": 0, "UYU": 2, "UYW": 4, "UZS": 2, "VED": 2, "VES": 2,
        "VND": 0, "VUV": 0, "WST": 2, "XAD": 2, "XAF": 0, "XCD": 2, "XCG": 2, "XOF": 0,
        "XPF": 0, "YER": 2, "ZAR": 2, "ZMW": 2, "ZWG": 2,
    }
)  # fmt: skip


def _one_line(value: str) -> str:
    # Ids and addresses end up in headers, logs and mails: no control characters.
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise ValueError("must not contain control characters")
    return value


def _decimal_string(value: object) -> object:
    """A non-negative decimal string ("12.50") becomes a Decimal; anything else is refused.

    A JSON number is refused even when it looks exact: it has been a binary float
    somewhere on its way, and money must never have been one.
    """
    if isinstance(value, Decimal):
        return value
    if not isinstance(value, str):
        raise ValueError('must be a decimal string such as "12.50", not a JSON number')
    whole, point, fraction = value.partition(".")
    if not (whole.isascii() and whole.isdigit()) or (whole != "0" and whole.startswith("0")):
        raise ValueError('must be a non-negative decimal string such as "12.50"')
    if point and not (fraction.isascii() and fraction.isdigit()):
        raise ValueError('must be a non-negative decimal string such as "12.50"')
    if len(whole) > MAX_INTEGER_DIGITS:
        raise ValueError(f"must have at most {MAX_INTEGER_DIGITS} digits before the point")
    # Digits and at most one point only: no sign, exponent, NaN or Infinity got here.
    return Decimal(value)


_EMAIL: Final = TypeAdapter(EmailStr)


def _email(value: str) -> str:
    """A bare address, kept as given (the receipt goes exactly there)."""
    try:
        _EMAIL.validate_python(value)
    except ValidationError:
        raise ValueError("is not a valid email address") from None
    return value


def _bounded_json(value: dict[str, Any]) -> dict[str, Any]:
    size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"is larger than {MAX_METADATA_BYTES} bytes as JSON")
    return value


Amount = Annotated[Decimal, BeforeValidator(_decimal_string)]
Identifier = Annotated[str, Field(min_length=1, max_length=255), AfterValidator(_one_line)]


class PaymentEvent(BaseModel):
    """A payment provider's event about one payment.

    `currency` is declared before `amount` so that the amount's check can read it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    event_id: Identifier
    payment_id: Identifier
    status: Literal["pending", "succeeded", "canceled", "refunded"]
    currency: str = Field(min_length=3, max_length=3)
    amount: Amount
    customer_email: Annotated[
        str, Field(min_length=3, max_length=320), AfterValidator(_one_line), AfterValidator(_email)
    ]
    metadata: Annotated[dict[str, Any], AfterValidator(_bounded_json)] = Field(default_factory=dict)

    @field_validator("currency")
    @classmethod
    def _iso_4217(cls, value: str) -> str:
        if not (value.isascii() and value.isalpha() and value.isupper()):
            raise ValueError("must be 3 uppercase letters (ISO 4217)")
        if value not in CURRENCY_MINOR_UNITS:
            raise ValueError("is not an active ISO 4217 currency code")
        return value

    @field_validator("amount")
    @classmethod
    def _minor_units(cls, value: Decimal, info: ValidationInfo) -> Decimal:
        currency = info.data.get("currency")
        if currency is None:  # refused on its own; nothing to compare with
            return value
        places = CURRENCY_MINOR_UNITS[currency]
        exponent = value.as_tuple().exponent
        assert isinstance(exponent, int)  # finite: checked by _decimal_string
        if -exponent > places:
            raise ValueError(f"has more than {places} decimal places, the minor unit of {currency}")
        return value

    def rpc_event(self) -> dict[str, Any]:
        """The event as apply_payment_event takes it; the amount stays a string, as given."""
        return {
            "provider": self.provider,
            "event_id": self.event_id,
            "payment_id": self.payment_id,
            "status": self.status,
            "amount": str(self.amount),
            "currency": self.currency,
            "customer_email": self.customer_email,
            "metadata": self.metadata,
        }


def _sqlstate_class(error: RpcError) -> str | None:
    code = error.code or ""
    return code[:2] if len(code) == 5 and not code.startswith("PGRST") else None


def job_error(error: RpcError) -> RetryableError | PermanentError:
    """What a failed apply_payment_event means for the job.

    Only the data can make it fail for good (a PostgREST 400/409 carrying a
    SQLSTATE of class 22, data exception, or 23, constraint violation). Anything
    else is a deployment or platform problem that a fix or time can cure: retried,
    with a message that says what to fix.
    """
    if error.transient:
        return RetryableError(f"payment event not applied yet ({error})")
    if error.status in (400, 409) and _sqlstate_class(error) in ("22", "23"):
        return PermanentError(
            f"payment event refused by the database: {error.code}: {error.message}"
        )
    if error.status == 404:
        return RetryableError(
            f"queue_worker.{FUNCTION} was not found ({error}): apply {MIGRATION} "
            "to the project and make sure RPC_SCHEMA names the schema it is in"
        )
    if error.status in (401, 403):
        return RetryableError(
            f"not allowed to call queue_worker.{FUNCTION} ({error}): "
            "SUPABASE_SERVICE_ROLE_KEY must be the project's service_role or secret key, "
            f"and {MIGRATION} grants service_role execute"
        )
    if error.status == 406:
        return RetryableError(
            f"the RPC schema is not exposed ({error}): add it to the API's exposed schemas"
        )
    return RetryableError(
        f"payment event not applied ({error}): check that {MIGRATION} is applied unchanged"
    )


class PaymentsProcessor:
    """Applies a payment event through `queue_worker.apply_payment_event`."""

    model = PaymentEvent

    def __init__(self, rpc: RpcCaller) -> None:
        self._rpc = rpc

    def validate(self, body: Any) -> None:
        parse_body(self.model, body)

    async def __call__(self, message: QueueMessage) -> None:
        event = parse_job(self.model, message)
        try:
            answer = await self._rpc.call(FUNCTION, {"event": event.rpc_event()})
        except RpcError as error:
            raise job_error(error) from error
        result = answer.get("result") if isinstance(answer, dict) else None
        if result not in RESULTS:
            # Applying again is harmless (at worst a duplicate), so try again.
            raise RetryableError(f"unexpected answer from {FUNCTION}: result {result!r}")
        metrics.PAYMENT_EVENTS.labels(result).inc()
        log.debug(
            "payment event",
            extra={
                "provider": event.provider,
                "event_status": event.status,
                "result": result,
                "payment_status": answer.get("status"),
                "receipt_enqueued": bool(answer.get("receipt_enqueued")),
            },
        )


def processor(resources: Resources) -> PaymentsProcessor:
    """The built-in `payments` processor (registered in app/processors/registry.py)."""
    return PaymentsProcessor(resources.rpc)
