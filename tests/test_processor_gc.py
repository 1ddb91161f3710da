"""`gc_freeze`: while a Processor runs, the objects made at start-up are left out of garbage
collection; stopping gives the embedding program its collector back."""

from __future__ import annotations

import gc

import pytest
from processor_support import Running, entry, produce, wait_for

from logferry.processors import Processor

pytestmark = pytest.mark.kafka


@pytest.mark.parametrize("freeze", [True, False])
def test_start_up_objects_are_frozen_only_while_running(kafka_bootstrap, make_topic, group_id, freeze):
    topic = make_topic()
    frozen_while_handling: list[int] = []
    app = Processor(group=group_id, topics=[topic], bootstrap_servers=kafka_bootstrap, gc_freeze=freeze)

    @app.handler
    def handle(_entry: dict, _ctx: object) -> None:
        frozen_while_handling.append(gc.get_freeze_count())

    assert gc.get_freeze_count() == 0
    with Running(app):
        produce(kafka_bootstrap, topic, [(b"k", entry(0))])
        wait_for(lambda: bool(frozen_while_handling), 30, "the record handled")
    assert (frozen_while_handling[0] > 0) is freeze
    assert gc.get_freeze_count() == 0
