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


def test_the_freeze_lasts_until_the_last_processor_of_the_process_stops(kafka_bootstrap, make_topic, group_id):
    topics = [make_topic(), make_topic()]
    frozen: dict[str, list[int]] = {t: [] for t in topics}
    apps = []
    for topic in topics:
        app = Processor(group=f"{group_id}-{topic}", topics=[topic], bootstrap_servers=kafka_bootstrap)
        app.handler(lambda _entry, ctx: frozen[ctx.topic].append(gc.get_freeze_count()))
        apps.append(app)
    first, second = Running(apps[0]), Running(apps[1])
    with first, second:
        first.stop()  # the second still runs: its start-up objects must stay frozen
        produce(kafka_bootstrap, topics[1], [(b"k", entry(0))])
        wait_for(lambda: bool(frozen[topics[1]]), 30, "the record handled")
    assert frozen[topics[1]][0] > 0
    assert gc.get_freeze_count() == 0


def test_objects_the_program_froze_itself_stay_frozen(kafka_bootstrap, make_topic, group_id):
    topic = make_topic()
    app = Processor(group=group_id, topics=[topic], bootstrap_servers=kafka_bootstrap)
    app.handler(lambda _entry, _ctx: None)
    gc.freeze()  # the embedding program's own choice
    try:
        before = gc.get_freeze_count()
        with Running(app):
            pass
        assert gc.get_freeze_count() >= before
    finally:
        gc.unfreeze()
