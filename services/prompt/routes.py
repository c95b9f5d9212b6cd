"""Routes: virtual model names, resolved per request to a configured model (docs/routes.md).

A request's `model` (or a prompt version's default model) may name a route from the `routes:`
config section instead of a model. The plan resolves it before anything model-specific (context
fit, quotas, moderation, the engine call), so from there on only the real model is seen; the
route's name goes to the end-of-stream log line. Rules are tried in order and the first that holds
picks a model or another route; the loader guarantees that each route ends with a default rule,
that every name exists and that no route leads back to itself, so resolution always ends.

Permission is checked once, on the name the request sent (`tenants[].models` may list routes):
granting a route grants whatever it picks, so a tenant can be given `auto` without being given
direct use of the large model behind it.
"""

from __future__ import annotations

from collections.abc import Callable

from promptline.config import Config, ModelConfig, RouteConfig, RouteRule
from promptline.v1.common_pb2 import ChatMessage

from .context_fit import Count


def find_route(config: Config, name: str) -> RouteConfig | None:
    for route in config.routes:
        if route.name == name:
            return route
    return None


def resolve(config: Config, route: RouteConfig, tenant: str,
            prompt_tokens: Callable[[], int]) -> ModelConfig:
    """The model `route` picks for a request of `tenant`. `prompt_tokens()` (the request's prompt
    size) is called only when a rule has a size condition, at most once."""
    size: int | None = None

    def tokens() -> int:
        nonlocal size
        if size is None:
            size = prompt_tokens()
        return size

    while True:
        name = _first_holding(route, tenant, tokens).model
        model = config.model(name)
        if model is not None:
            return model
        next_route = find_route(config, name)
        # The loader checked every rule's target exists: a model or a route.
        assert next_route is not None, f"route {route.name!r} names unknown {name!r}"
        route = next_route


def _first_holding(route: RouteConfig, tenant: str, prompt_tokens: Callable[[], int]
                   ) -> RouteRule:
    for rule in route.rules[:-1]:
        if rule.tenants is not None and tenant not in rule.tenants:
            continue
        if rule.max_prompt_tokens is not None and prompt_tokens() > rule.max_prompt_tokens:
            continue
        return rule
    return route.rules[-1]  # the default: the loader makes sure it has no condition


def counted_once(count: Count) -> Count:
    """`count`, remembering each message's tokens by identity for one request: the route's
    prompt size and the context fit then count a message once between them. The caller keeps
    the messages alive meanwhile, so no other object can take an id."""
    counts: dict[int, int] = {}

    def count_once(message: ChatMessage) -> int:
        key = id(message)
        tokens = counts.get(key)
        if tokens is None:
            tokens = counts[key] = count(message)
        return tokens

    return count_once
