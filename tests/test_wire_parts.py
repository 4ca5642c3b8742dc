"""Multi-part messages: splitting, reassembly, and rejection of parts that do not fit."""

from __future__ import annotations

import pytest
import torch

from concord.comm.channel import ClientChannel
from concord.comm.parts import PartAssembler, split_message
from concord.comm.server_channel import ServerChannel
from concord.comm.wire import Codec, Message, WireError

SECRET = bytes(range(32))


def _msg() -> Message:
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}  # 400 bytes each
    return Message("push", worker=2, step=7, meta={"hp": 1}, tensors=tensors)


def test_split_groups_whole_tensors_and_marks_parts():
    parts = split_message(_msg(), msg_id=9, part_bytes=1000)
    assert [list(p.tensors) for p in parts] == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    assert [p.meta["part"] for p in parts] == [[9, 0, 3], [9, 1, 3], [9, 2, 3]]
    assert parts[0].meta["hp"] == 1 and "hp" not in parts[1].meta
    assert {(p.op, p.worker, p.step) for p in parts} == {("push", 2, 7)}
    whole = _msg()
    assert split_message(whole, msg_id=1, part_bytes=1 << 20) == [whole]  # fits: itself
    big = Message("x", tensors={"a": torch.ones(10), "b": torch.ones(1000), "c": torch.ones(1)})
    assert [list(p.tensors) for p in split_message(big, 0, 100)] == [["a"], ["b"], ["c"]]
    with pytest.raises(ValueError, match="reserved"):
        split_message(Message("x", meta={"part": 1}), 0)


def test_assembler_rebuilds_the_message_from_parts_of_interleaved_senders():
    joined = PartAssembler(max_bytes=1 << 20)
    a, b = split_message(_msg(), 1, 1000), split_message(_msg(), 5, 1000)
    got = [joined.add(sender, part) for pair in zip(a, b) for sender, part in zip(b"AB", pair)]
    assert got[:4] == [None] * 4
    for whole in got[4:]:
        assert whole.meta == {"hp": 1} and (whole.op, whole.worker, whole.step) == ("push", 2, 7)
        assert list(whole.tensors) == [f"t{i}" for i in range(5)]
        assert all(torch.equal(whole.tensors[k], v) for k, v in _msg().tensors.items())
    pull = Message("pull")
    assert joined.add(b"A", pull) is pull  # a single-part message passes as it is


@pytest.mark.parametrize(
    "mangle, kind",
    [
        (lambda p: [p[0], p[2]], "frames"),  # a part skipped
        (lambda p: [p[0], p[0]], "frames"),  # restarted before the end
        (lambda p: [p[0], Message("pull")], "frames"),  # another message in between
        (lambda p: [p[0], _with(p[1], step=8)], "frames"),  # changes the step
        (lambda p: [p[0], _with(p[1], tensors=p[0].tensors)], "header"),  # repeats keys
        (lambda p: [_with(p[0], meta={"part": [1, 3, 3]})], "header"),  # bad marker
    ],
)
def test_assembler_rejects_parts_that_do_not_fit(mangle, kind):
    joined = PartAssembler(max_bytes=1 << 20)
    parts = mangle(split_message(_msg(), 1, 1000))
    for part in parts[:-1]:
        assert joined.add(b"A", part) is None
    with pytest.raises(WireError) as err:
        joined.add(b"A", parts[-1])
    assert err.value.kind == kind


def test_assembler_bounds_the_whole_message_and_swallows_the_rest_after_an_error():
    joined = PartAssembler(max_bytes=1000)
    parts = split_message(_msg(), 3, 500)  # five parts of 400 bytes: the third is too many
    assert joined.add(b"A", parts[0]) is None and joined.add(b"A", parts[1]) is None
    with pytest.raises(WireError) as err:
        joined.add(b"A", parts[2])
    assert err.value.kind == "oversize"
    assert [joined.add(b"A", p) for p in parts[3:]] == [None, None]  # one error per message
    assert joined.add(b"A", Message("pull")).op == "pull"  # and the sender can go on


def test_channels_send_and_answer_large_messages_in_authenticated_parts():
    server = ServerChannel(Codec(SECRET), name="test server")
    client = ClientChannel(Codec(SECRET), server.address, "server 0", timeout=10)
    server.part_bytes = client.part_bytes = 1000
    try:
        client.send(_msg())
        req = server.poll(timeout=10)
        assert req is not None and req.msg.meta == {"hp": 1} and len(req.msg.tensors) == 5
        doubled = {k: 2 * v for k, v in req.msg.tensors.items()}
        before: list[list[str]] = []
        trackers = server.reply_many(
            [req.peer],
            Message("params", step=8, tensors=doubled),
            True,
            before_part=lambda part: before.append(list(part.tensors)),
        )
        assert len(trackers) == 3 and before == [["t0", "t1"], ["t2", "t3"], ["t4"]]
        seen: list[list[str]] = []
        reply = client.recv(awaiting="params", on_part=lambda part: seen.append(list(part.tensors)))
        assert seen == before  # each part was handed over as it came, in order
        assert reply.step == 8 and list(reply.tensors) == list(doubled)
        assert all(torch.equal(reply.tensors[k], v) for k, v in doubled.items())
    finally:
        client.close()
        server.close()


def _with(msg: Message, **changes) -> Message:
    from dataclasses import replace

    return replace(msg, **changes)
