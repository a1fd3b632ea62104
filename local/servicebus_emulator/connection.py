"""One client connection: SASL and AMQP handshakes, then performatives routed to the broker.

An ``asyncio.Protocol`` on the broker's single event loop. Frames produced while handling received bytes are
buffered and written by :meth:`Broker.flush` only after the store has committed, so nothing is acknowledged
before it is durable.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from azure.servicebus._pyamqp.error import AMQPError
from azure.servicebus._pyamqp.performatives import (
    BeginFrame,
    CloseFrame,
    DetachFrame,
    EndFrame,
    FlowFrame,
    OpenFrame,
    SASLMechanism,
    SASLOutcome,
    TransferFrame,
)

from . import frames
from .session import Link, Session

if TYPE_CHECKING:
    from .broker import Broker

__all__ = ["Connection"]

_LOGGER = logging.getLogger(__name__)
MAX_FRAME_SIZE = 1024 * 1024
WINDOW = 2**31 - 1
_MECHANISMS = [b"ANONYMOUS", b"PLAIN", b"MSSBCBS"]
_OPEN, _BEGIN, _ATTACH, _FLOW, _TRANSFER, _DISPOSITION, _DETACH, _END, _CLOSE = range(0x10, 0x19)
_SASL_INIT = 0x41


class Connection(asyncio.Protocol):
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._buffer = frames.FrameBuffer(MAX_FRAME_SIZE)
        self._stage = "header"  # header -> sasl -> amqp-header -> open -> opened -> closed
        self.sessions: dict[int, Session] = {}  # by the peer's channel
        self.out = bytearray()
        self.remote_max_frame_size = 512
        self.transport: asyncio.Transport | None = None
        self._heartbeat: asyncio.TimerHandle | None = None
        self._heartbeat_interval = 0.0

    # -- asyncio.Protocol -----------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.broker.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self._buffer.feed(data)
        try:
            self._process()
        except Exception as exc:  # the connection's last word: undo the turn, close with the error
            _LOGGER.exception("protocol error, closing the connection", extra={"action": "close"})
            self._fail(exc)
        self.broker.flush()
        if self._stage == "closed" and self.transport is not None:
            self.transport.close()

    def _fail(self, exc: Exception) -> None:
        """A frame failed half-way. Nothing of this turn has been committed or sent (the broker flushes at the
        end of a turn and handlers only write to their own connection), so undo all of it, drop the replies, and
        close: the peer sees no acknowledgement for work that was not kept."""
        self.broker.abort()
        self.out.clear()
        for session in list(self.sessions.values()):
            self._end_session(session)
        self.sessions.clear()
        self.close(b"amqp:internal-error", str(exc))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for session in list(self.sessions.values()):
            self._end_session(session)
        self.sessions.clear()
        self.broker.connections.discard(self)
        self.transport = None

    # -- output ---------------------------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self.out:
            self.broker.dirty.add(self)
        self.out += data

    def flush(self) -> None:
        if self.out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(bytes(self.out))
        self.out.clear()

    def send(self, session: Session, performative: Any) -> None:
        self.write(frames.encode(session.channel, performative))

    def send_flow(self, session: Session, link: Link | None = None, *, credit: int | None = None) -> None:
        self.send(
            session,
            frames.make(
                FlowFrame,
                next_incoming_id=session.next_incoming_id,
                incoming_window=WINDOW,
                next_outgoing_id=session.next_outgoing_id,
                outgoing_window=WINDOW,
                handle=link.handle if link else None,
                delivery_count=link.delivery_count if link else None,
                link_credit=credit if link else None,
                drain=link.drain if link else False,
            ),
        )

    def send_transfer(self, link: Link, tag: bytes, payload: bytes, *, settled: bool) -> int:
        """Send one delivery (split over several frames when needed); returns its delivery id."""
        session = link.session
        delivery_id = session.next_delivery_id
        session.next_delivery_id = (delivery_id + 1) % 2**32
        chunk = max(self.remote_max_frame_size - 256, 256)
        offset = 0
        while True:
            piece = payload[offset : offset + chunk]
            offset += chunk
            more = offset < len(payload)
            first = offset == chunk
            self.send(
                session,
                frames.make(
                    TransferFrame,
                    handle=link.handle,
                    delivery_id=delivery_id if first else None,
                    delivery_tag=tag if first else None,
                    message_format=0 if first else None,
                    settled=settled,
                    more=more,
                    payload=piece,
                ),
            )
            session.next_outgoing_id = (session.next_outgoing_id + 1) % 2**32
            if not more:
                return delivery_id

    def close(self, condition: bytes | None = None, description: str | None = None) -> None:
        error = AMQPError(condition=condition, description=description) if condition else None
        self.write(frames.encode(0, frames.make(CloseFrame, error=error)))
        self._stage = "closed"

    # -- input ----------------------------------------------------------------------------------------------------
    def _process(self) -> None:
        while self._stage != "closed":
            if self._stage in ("header", "amqp-header"):
                header = self._buffer.header()
                if header is None:
                    return
                self._on_header(header)
                continue
            stage = self._stage
            for frame in self._buffer.frames():
                self._on_frame(frame)
                if self._stage != stage:
                    break
            else:
                return

    def _on_header(self, header: bytes) -> None:
        if self._stage == "header" and header == frames.SASL_HEADER:
            self.write(
                frames.SASL_HEADER + frames.encode_sasl(frames.make(SASLMechanism, sasl_server_mechanisms=_MECHANISMS))
            )
            self._stage = "sasl"
        elif header == frames.AMQP_HEADER:
            self.write(frames.AMQP_HEADER)
            self._stage = "open"
        else:
            _LOGGER.warning("unsupported protocol header %r (TLS is not supported)", header, extra={"action": "reject"})
            self.write(frames.SASL_HEADER if self._stage == "header" else frames.AMQP_HEADER)
            self._stage = "closed"

    def _on_frame(self, frame: frames.Frame) -> None:
        code, fields = frame.code, frame.fields
        if _LOGGER.isEnabledFor(logging.DEBUG):
            _LOGGER.debug("<- ch%d %#x %r", frame.channel, code, fields[:6])
        if code == -1:
            return  # heartbeat
        if self._stage == "sasl":
            if code != _SASL_INIT:
                raise ValueError(f"expected sasl-init, got performative {code:#x}")
            self.write(frames.encode_sasl(frames.make(SASLOutcome, code=0, additional_data=None)))
            self._stage = "amqp-header"
            return
        if code == _OPEN:
            self._on_open(fields)
            return
        if code == _BEGIN:
            self._on_begin(frame.channel, fields)
            return
        if code == _CLOSE:
            for ended in list(self.sessions.values()):
                self._end_session(ended)
            self.sessions.clear()
            self.close()
            return
        session = self.sessions.get(frame.channel)
        if session is None:  # the SDK may detach links after ending their session
            _LOGGER.debug("frame %#x on channel %d without a session ignored", code, frame.channel)
            return
        self._on_session_frame(session, frame)

    def _on_session_frame(self, session: Session, frame: frames.Frame) -> None:
        code, fields = frame.code, frame.fields
        if code == _ATTACH:
            self.broker.attach(session, fields)
        elif code == _FLOW:
            self._on_flow(session, fields)
        elif code == _TRANSFER:
            self._on_transfer(session, fields)
        elif code == _DISPOSITION:
            self.broker.disposition(session, fields)
        elif code == _DETACH:
            link = session.links.pop(fields[0], None)
            if link is not None:
                self.broker.detach(link)
                self.send(session, frames.make(DetachFrame, handle=link.handle, closed=fields[1]))
        elif code == _END:
            self._end_session(session)
            del self.sessions[frame.channel]
            self.send(session, frames.make(EndFrame))

    def _on_begin(self, channel: int, fields: list[Any]) -> None:
        session = Session(connection=self, channel=channel, remote_channel=channel, next_incoming_id=fields[1])
        self.sessions[channel] = session
        begin = frames.make(
            BeginFrame,
            remote_channel=channel,
            next_outgoing_id=0,
            incoming_window=WINDOW,
            outgoing_window=WINDOW,
            handle_max=WINDOW,
        )
        self.send(session, begin)

    def _on_open(self, fields: list[Any]) -> None:
        self.remote_max_frame_size = min(fields[2] or MAX_FRAME_SIZE, MAX_FRAME_SIZE)
        self._stage = "opened"
        self.write(
            frames.encode(
                0,
                frames.make(
                    OpenFrame,
                    container_id="servicebus-emulator",
                    hostname=None,
                    max_frame_size=MAX_FRAME_SIZE,
                    channel_max=65535,
                ),
            )
        )
        if fields[4]:  # the peer's idle timeout (ms): keep it alive with empty frames
            self._heartbeat_interval = fields[4] / 2000
            self._schedule_heartbeat()

    def _schedule_heartbeat(self) -> None:
        loop = asyncio.get_running_loop()
        self._heartbeat = loop.call_later(self._heartbeat_interval, self._beat)

    def _beat(self) -> None:
        if self.transport is None:
            return
        self.write(frames.EMPTY_FRAME)
        self.broker.flush()
        self._schedule_heartbeat()

    def _on_flow(self, session: Session, fields: list[Any]) -> None:
        if fields[4] is None:  # session-level flow only
            return
        link = session.links.get(fields[4])
        if link is None or not link.outgoing:
            return
        peer_delivery_count = fields[5] if fields[5] is not None else 0
        link.credit = max(peer_delivery_count + (fields[6] or 0) - link.delivery_count, 0)
        link.drain = bool(fields[8])
        self.broker.credit(link)
        if fields[9]:  # echo
            self.send_flow(session, link, credit=link.credit)

    def _on_transfer(self, session: Session, fields: list[Any]) -> None:
        session.next_incoming_id = (session.next_incoming_id + 1) % 2**32
        link = session.links[fields[0]]
        payload = fields[11]
        if link.partial is not None or fields[5]:  # more frames of one delivery
            if link.partial is None:
                link.partial, link.partial_first = bytearray(), fields
            link.partial += payload
            if fields[5]:
                return
            payload, fields = bytes(link.partial), link.partial_first or fields
            link.partial = link.partial_first = None
        link.credit_granted -= 1
        self.broker.transfer(link, fields, bytes(payload))

    def _end_session(self, session: Session) -> None:
        for link in list(session.links.values()):
            self.broker.detach(link)
        session.links.clear()
