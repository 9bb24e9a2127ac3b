"""The local broker's cluster id never reads as an option to Kafka's storage tool."""

import base64
import uuid

from hypothesis import given, strategies as st

from services.devstack.infra import new_cluster_id


@given(st.lists(st.binary(min_size=16, max_size=16), min_size=1, max_size=5).map(
    lambda draws: draws + [bytes(16)]))
def test_cluster_id_never_starts_with_a_dash_and_is_the_first_usable_draw(draws):
    uuids = iter(uuid.UUID(bytes=raw) for raw in draws)
    cluster_id = new_cluster_id(lambda: next(uuids))
    assert not cluster_id.startswith("-")
    assert len(cluster_id) == 22
    usable = [raw for raw in draws if not base64.urlsafe_b64encode(raw).startswith(b"-")]
    assert base64.urlsafe_b64decode(cluster_id + "==") == usable[0]


def test_an_id_that_would_start_with_a_dash_is_drawn_again():
    # 0xf8 encodes to "-" as the first URL-safe base64 character.
    draws = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=bytes(16))])
    assert new_cluster_id(lambda: next(draws)) == "AAAAAAAAAAAAAAAAAAAAAA"
