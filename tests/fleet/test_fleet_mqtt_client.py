"""The fleet's paho client: what a publish handle says about a message paho could not send."""

from __future__ import annotations

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from slmops_fleet.mqtt_client import _Handle


def test_handle_wait_is_false_for_a_message_paho_could_not_send() -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="never-connected")
    info = client.publish("t", b"x", qos=1)  # not connected: paho queues it with rc NO_CONN
    with pytest.raises(RuntimeError):
        info.is_published()
    assert _Handle(info).wait(0.1) is False
