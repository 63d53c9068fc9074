"""The agent in-process: real ``Agent`` objects on the fake broker and the fake Home Assistant, on virtual
time (harness.inprocess). Faults and hostile input that do not need a real process or broker live here."""

from __future__ import annotations

from harness import inprocess, vclock


def test_three_agents_elect_the_best_then_fail_over_at_once_on_a_crash() -> None:
    async def scenario() -> None:
        async with inprocess.cluster() as c:
            for i, priority in ((1, 100), (2, 90), (3, 80)):
                await c.add(f"n{i}", priority=priority)
            assert await c.wait_for_leader() == "n1"
            killed = await c.kill("n1")
            assert await c.wait_for_leader(other_than="n1") == "n2"
            [promotion] = c.promotions(after=killed)
            assert promotion["t"] - killed < 0.1  # the will: no lease to wait out

    vclock.run(scenario())
