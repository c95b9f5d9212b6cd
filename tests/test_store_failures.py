"""One rule for "the Redis store failed", shared by quotas, prompts and conversations: redis-py's
errors, timeouts, socket errors, and any other exception raised inside redis-py (its cluster
client has raised AttributeError mid-failover). Our own bugs are not store failures."""

from __future__ import annotations

import logging

import pytest
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from promptline.errors import ErrorCode, PromptlineError
from promptline.redis_store import StoreOutage, is_store_failure, store_call
from services.prompt.prompts import not_found, store_errors


def raised_inside_redis_py() -> Exception:
    try:
        key_slot(None)  # type: ignore[arg-type]  # AttributeError inside redis.crc, no RedisError
    except Exception as exc:
        return exc
    raise AssertionError("key_slot(None) did not raise")


def raised_here() -> Exception:
    try:
        None.writelines  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        return exc
    raise AssertionError("unreachable")


def test_what_counts_as_a_store_failure() -> None:
    assert is_store_failure(RedisConnectionError("gone"))
    assert is_store_failure(TimeoutError())
    assert is_store_failure(ConnectionResetError())
    inside = raised_inside_redis_py()
    assert not isinstance(inside, RedisError) and is_store_failure(inside)
    assert not is_store_failure(raised_here())
    assert not is_store_failure(ValueError("never raised"))  # no traceback: not from redis-py


async def test_store_call_turns_any_client_failure_into_a_redis_error() -> None:
    async def failing(exc: Exception) -> None:
        raise exc

    with pytest.raises(RedisError, match="redis client failed: AttributeError"):
        await store_call(failing(raised_inside_redis_py()))
    with pytest.raises(AttributeError):  # a bug of ours stays a bug (INTERNAL), loudly
        await store_call(failing(raised_here()))


@pytest.mark.parametrize("make", [raised_inside_redis_py, RedisConnectionError, TimeoutError])
def test_prompt_and_conversation_stores_answer_unavailable(make: type[Exception]) -> None:
    with pytest.raises(PromptlineError) as caught, store_errors("conversation"):
        raise make()
    assert caught.value.code is ErrorCode.UNAVAILABLE
    assert caught.value.message == "the conversation store is unavailable"


def test_errors_of_our_own_pass_through_the_store_boundary() -> None:
    with pytest.raises(PromptlineError) as caught, store_errors("prompt"):
        raise not_found("unknown prompt 'x'")
    assert caught.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(AttributeError), store_errors("prompt"):
        raise raised_here()


def test_an_answer_ends_the_skipping_a_failure_began(caplog: pytest.LogCaptureFixture) -> None:
    """A stall times out some calls while another, sent before it, answers: the store is there,
    so the next call goes to it instead of being skipped (and failed, under fail_closed) for the
    rest of STORE_RETRY_S, and the outage is logged once begun and once ended, not again."""
    outage = StoreOutage(logging.getLogger("test.outage"), "lost (%s)", "back")
    with caplog.at_level(logging.WARNING, logger="test.outage"):
        assert outage.failed(TimeoutError()) and outage.skipping()
        assert outage.answered() and not outage.skipping()
        assert not outage.answered()
    assert [r.getMessage() for r in caplog.records] == ["lost (TimeoutError)", "back"]
