"""SDK queue tests that are not run against the emulator, each with its reason.

Keyed by ``<file>::<test function>`` (every parametrisation of it). Only tests of features the emulator does not
have belong here, or tests that cannot pass against any broker; a test that *expects* the emulator to refuse an
unsupported feature (a session receiver on a plain queue, say) is run.
"""

from __future__ import annotations

__all__ = ["EXCLUDED"]

_SYNC = "test_queues.py"
_ASYNC = "test_queues_async.py"
_WEBSOCKETS = "AMQP over WebSockets: the emulator speaks plain AMQP only"
_SETTLE_PATCH = (
    "upstream-defective: its patch of ReceiveClient.settle_messages (settle_messages_async) lacks the await_outcome"
    " keyword that SDK 7.15.0 passes, so the test fails with a TypeError in its own code, against any broker"
)

EXCLUDED: dict[str, str] = {
    f"{_SYNC}::test_queue_message_amqp_over_websocket": _WEBSOCKETS,
    f"{_SYNC}::test_queue_send_twice": _WEBSOCKETS,
    f"{_SYNC}::test_queue_send_timeout": _WEBSOCKETS + " (its second half)",
    f"{_SYNC}::test_queue_send_large_message_receive": _WEBSOCKETS + " (its second half)",
    f"{_SYNC}::test_queue_operation_negative": _SETTLE_PATCH,
    f"{_ASYNC}::test_queue_message_amqp_over_websocket": _WEBSOCKETS,
    f"{_ASYNC}::test_async_queue_send_twice": _WEBSOCKETS,
    f"{_ASYNC}::test_async_queue_send_timeout": _WEBSOCKETS + " (its second half)",
    f"{_ASYNC}::test_async_queue_send_large_message_receive": _WEBSOCKETS + " (its second half)",
    f"{_ASYNC}::test_async_queue_operation_negative": _SETTLE_PATCH,
}
