"""Entity state sync: each mirrored entity has one retained record on the bus, and every node converges on
the newest.

The data flow, module by module: ``hlc`` stamps versions; ``state`` is the pure reconciliation
(``SyncState.handle(event, now) -> actions``, its theory of operation at the top); ``selection`` says which
entities are mirrored and throttles chatty ones; ``replica`` drives the state machine from the broker and
a backend (``backend``'s protocols), where the entities live: Home Assistant (``hasync.homeassistant.backend``)
or memory (``memory``, for tests and benchmarks).
"""
