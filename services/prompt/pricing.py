"""What a stream costs, in exact decimals: the one place prices are applied to token counts.

Money is `decimal.Decimal` in Python and an integer number of pico-dollars (1e-12 USD) in Redis
and in every counter. Why pico: a price has at most 6 decimal places per million tokens (the
config enforces it), so one token costs a whole number of pico-dollars (`$0.15/Mtok` is 150,000
pico-USD a token; a cached `$0.01875/Mtok` is 18,750), and any sum of token costs is an exact
integer. A signed 64-bit Redis integer holds 9.2 million dollars of them, beyond any budget the
config accepts (at most $1,000,000 per period). Nano-dollars would already round `$0.01875/Mtok`.

On the wire a cost is a decimal string (`Usage.cost_usd`, the JSON `cost_usd`): exact, and read
by any language without a float in between.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from typing import Protocol

from promptline.config import Config, ModelConfig, Price

PICO = Decimal("1e-12")
"""The unit of every stored amount, in USD."""
MTOK = 1_000_000
ZERO = Decimal(0)


class TokenCounts(Protocol):
    """What a cost is computed from (`common_pb2.Usage` is one)."""

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def completion_tokens(self) -> int: ...

    @property
    def cached_prompt_tokens(self) -> int: ...


def cost_of(price: Price, usage: TokenCounts, *, cached: bool = False,
            fraction: Decimal | float = ZERO) -> Decimal:
    """The cost of `usage` at `price`, in USD, to the pico-dollar.

    Prompt tokens the provider served from its prompt cache (`cached_prompt_tokens`, part of
    `prompt_tokens`) cost `cached_input_per_mtok`; the others `input_per_mtok`; completion tokens
    `output_per_mtok`. A reply served from Promptline's own response cache (`cached`) costs
    `fraction` of that (rounded half-up to the pico-dollar, so what `done` reports is exactly
    what is charged). A float `fraction` (a config share) counts as the decimal it is written
    as (0.1, not 0.1000000000000000055...).
    """
    cached_in = min(max(0, usage.cached_prompt_tokens), max(0, usage.prompt_tokens))
    fresh_in = max(0, usage.prompt_tokens) - cached_in
    cost = (fresh_in * price.input_per_mtok + cached_in * cached_input_price(price)
            + max(0, usage.completion_tokens) * price.output_per_mtok) / MTOK
    if cached:
        cost *= fraction if isinstance(fraction, Decimal) else Decimal(repr(fraction))
    return cost.quantize(PICO, rounding=ROUND_HALF_UP).normalize() if cost else ZERO


def worst_case(price: Price, prompt_tokens: int, max_tokens: int) -> Decimal:
    """What a request may cost at most: its whole prompt at the full input price (whether the
    provider's cache will serve part of it is unknown in advance) and `max_tokens` of output."""
    return (max(0, prompt_tokens) * price.input_per_mtok
            + max(0, max_tokens) * price.output_per_mtok) / MTOK


def budget_reservation(config: Config, model: ModelConfig, prompt_tokens: int,
                max_tokens: int) -> Decimal:
    """A budget's reservation: the worst case at the dearest of the model and its fallbacks (the
    engine may answer with any of them)."""
    chain = [model, *(m for name in model.fallback if (m := config.model(name)) is not None)]
    return max(worst_case(m.price, prompt_tokens, max_tokens) for m in chain)


def cached_input_price(price: Price) -> Decimal:
    """Prompt tokens from the provider's prompt cache; without a price of their own, the input
    price."""
    return price.input_per_mtok if price.cached_input_per_mtok is None \
        else price.cached_input_per_mtok


def to_pico(usd: Decimal) -> int:
    """USD -> whole pico-dollars, rounded up (a reservation never falls short)."""
    return int((usd / PICO).to_integral_value(rounding=ROUND_CEILING))


def from_pico(pico: int) -> Decimal:
    """Whole pico-dollars -> USD, exact."""
    return (Decimal(pico) * PICO).normalize() if pico else ZERO


def usd_text(usd: Decimal) -> str:
    """The wire's decimal string: plain notation, no exponent, no trailing zeros ("0.00015")."""
    return format(usd.normalize(), "f") if usd else "0"


__all__ = ["PICO", "TokenCounts", "budget_reservation", "cached_input_price", "cost_of",
           "from_pico", "to_pico", "usd_text", "worst_case"]
