"""The agent fuzzed in-process (harness.fuzz): hypothesis draws sequences of schema-valid extremes and garbage
on every topic the agents read; after each message no agent may have failed or crashed, two primaries never
coexist, and terms never go back. The CI run is short; HASYNC_FUZZ_EXAMPLES sets a longer hunt (the long
run's command and result are in the README)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import fuzz, vclock

SENT = [0]


EXAMPLES = int(os.environ.get("HASYNC_FUZZ_EXAMPLES", "40"))
LENGTH = int(os.environ.get("HASYNC_FUZZ_LENGTH", "1"))  # the fewest messages of a sequence


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(st.lists(fuzz.messages(), min_size=LENGTH, max_size=LENGTH + 100))
def test_no_message_sequence_crashes_an_agent_or_makes_two_primaries(messages: list[fuzz.Message]) -> None:
    async def scenario() -> None:
        run = fuzz.Run()
        await run.start()
        try:
            for message in messages:
                await run.send(message)
        finally:
            SENT[0] += run.sent
            await run.close()

    vclock.run(scenario())


def teardown_module() -> None:
    print(f"\nfuzz: {SENT[0]} messages sent to the agents")
