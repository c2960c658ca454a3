"""baton.protocol and include/baton.h agree: every frame type and endpoint constant has the same value."""

from __future__ import annotations

import pytest

from baton import native, protocol


@pytest.mark.skipif(not native.AVAILABLE, reason="libbaton is not built")
def test_message_types_match_the_c_header() -> None:
    c = native.protocol_constants()
    py = {m.name: int(m) for m in protocol.MsgType}
    assert {k: v for k, v in c.items() if k in py} == py
    assert set(py) == set(native.MSG_NAMES), "a frame type exists on one side only"


@pytest.mark.skipif(not native.AVAILABLE, reason="libbaton is not built")
def test_endpoint_ids_match_the_c_header() -> None:
    c = native.protocol_constants()
    assert c["EP_NONE"] == protocol.EP_NONE
    assert c["EP_COORDINATOR"] == protocol.EP_COORDINATOR


@pytest.mark.skipif(not native.AVAILABLE, reason="libbaton is not built")
def test_control_payload_sizes_and_ring_default_match() -> None:
    assert native.lib.BT_RING_SETUP_DEFAULT_CAPACITY == protocol.DEFAULT_RING_CAPACITY
    sizes = {"AGENT": protocol.CTL_AGENT, "CLOSE": protocol.CTL_CLOSE, "REVOKE": protocol.CTL_REVOKE,
             "PAUSE": protocol.CTL_PAUSE}
    for name, st in sizes.items():
        assert native.ctl_payload_size(name) == st.size, name
