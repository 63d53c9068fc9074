"""What bounds the figures: findings from investigating the runs, printed in the report.

These are observations about hasync as it was when they were made (see the report's git commit); a
change to hasync's MQTT layer or election can make them stale, so re-check them when a figure moves.
"""

ANALYSIS = """\
Investigated on 2026-11-22 with the agents at log level DEBUG (JSON logs with millisecond timestamps)
and `py-spy dump`:

- **Crash failover and graceful handover are two or three broker round trips.** After the trigger (the
  Last Will, or the release naming the successor) the new primary needs its claim to come back, then
  its first renewal to come back (`promote` is logged only then); a step-down adds the command's and
  the release's trips. Until commit 2865457 these trips were held by Nagle's algorithm: paho-mqtt (under
  aiomqtt) does not set `TCP_NODELAY`, so a small publish written while an earlier small write (a PUBACK,
  the heartbeat published beside the claim) was unacknowledged waited for the broker's delayed ACK
  (40 ms on Linux); each echo came back ~42 ms after the publish. Quick run at 06ea54d: kill -9 median
  52-92 ms, step-down median 136 ms (target 50 ms missed). Setting `TCP_NODELAY` from outside (a
  `sitecustomize` wrapping `socket.create_connection`) brought them to 6-10 ms and 5-43 ms; Mosquitto's
  `set_tcp_nodelay` alone did not help. Commit 2865457 (state sync's throughput work) set `TCP_NODELAY`
  in `hasync/mqtt.py`; the figures above are with it. If these figures jump back to ~50-150 ms, check
  that it is still set.
- **A node that just (re)connected reports itself eligible before it may claim.** After seeing a
  primary its heartbeat and `/healthz` say `eligible: true` at once, but it may claim only after
  observing a full lease (3 s) since it connected. If the primary fails in that window, a lower-ranked
  peer waits one `claim_stagger` (150 ms) for it in vain (seen as 160-300 ms failovers before the
  benchmark waited `lease_duration` + 1.5 s after every agent start).
- **Hang failover** is bounded by design: the followers wait `lease_duration` (3 s) of silence after the
  last renewal they received (0-0.5 s before the SIGSTOP), then claim and need the two echoes; 2.5-3.2 s
  expected, target `lease + 0.5 s`.
- **Broker restart** is bounded by design: reconnect backoff (first attempt after 0.2 s, with jitter),
  then a full lease of observation after reconnecting before anyone may claim: about 3.2-3.5 s.
- **Sync latency and throughput are bounded by CPU on two cores.** An update crosses four processes that
  share the two cores: the load generator, agent A (HTTP request, stamping, JSON encoding, publishing,
  and recognising its own record when it comes back, which is how it knows the broker has it), the broker,
  and agent B (parsing and validating the record, reconciling, applying). Profiled 2026-11-22 (`py-spy
  record`): in A, paho's socket reading and writing about 40 %, the HTTP handler about 12 %, the state
  machine about 10 %. Issue 13's first changes (buffered reads, joined writes, the echo recognised by its
  bytes, the collector tuned) brought A to 312 µs of CPU per update at 1,000/s and B to 147 µs (2026-12-03
  morning, `footprint-load`). cProfile of both agents then (CPU time) still put paho's per-packet path (a
  message object, properties and a log call per packet, three reads, a PUBACK built by paho) at about half of
  A's CPU; since the afternoon of 2026-12-03 `hasync.wire` frames MQTT 3.1.1 itself and reads, acknowledges
  and sends PUBLISH and PUBACK without paho (paho keeps the connection's lifecycle and every other packet),
  the publisher writes each burst at once, and the HTTP API keeps connections alive: A 199 µs, B 118 µs per
  update (`footprint-load`), RSS under load 47-48.5 MiB instead of 50-51. The plain aiomqtt loop still goes
  through paho's per-packet path, so it is no longer a ceiling: sync applies 7,988 updates/s where the loop
  receives 5,656 msg/s (ratio 1.41; amqtt 0.84). Latency at 1,000/s: p50 2.79, p95 3.90, p99 5.53 ms against
  the plain loop's 0.68, 2.81 and 6.29 ms in the same run: at the 99th percentile the bus alone is above the
  2 ms target on this machine, so the target is out of reach here whatever the agents do. Where a batch of
  ten changes spends its time (timestamps traced in both agents, medians): A's HTTP handler 0.35-0.5 ms
  (about 40 µs a change: JSON, stamping and validating the record twice), A's write 0.1-0.8 ms after it,
  B's read 0.2-0.3 ms after that, B's apply 0.5 ms after its read; the rest is waiting for a core: a send on
  loopback wakes the receiver, which often runs before the sender goes on (seen as a 2 ms `send`).
- **Snapshot convergence** is measured from the joiner's process start: 1,000 entities take 544 ms and
  10,000 take 962 ms (median of 5, 878-1,123 ms; 2026-12-03 afternoon, was 565 and 1,175 ms that morning),
  so about 0.5 s is fixed and each entity costs about 46 µs to receive, validate and apply (was 68: the wire
  path above, and `pending()` is now kept per event instead of a pass over every entity on each read of
  `/metrics`, which the benchmark polls). The fixed part: the process start to the agent's first log line
  takes 0.45-0.55 s, of which importing the CLI about 0.3 s, mostly building classes (pydantic models and
  about 125 dataclasses; self time at import: `hasync.config` 46 ms, `hasync.election` 27, `hasync.sync.state`
  23, `hasync.messages` 22, `python -X importtime`); connecting and subscribing take 20-60 ms more.
- **RSS** is mostly imports. An agent that syncs no Home Assistant and exports nothing does not import
  aiohttp (only the Home Assistant link, the add-on's Supervisor client and the demo import it): idle
  42.7-42.8 MiB (2026-12-03, `footprint`), 47-50.5 MiB at 1,000 updates/s, where 1,000 entities with their
  records and the memory backend's apply log (a benchmark instrument, bounded to 50,000 entries) add the
  rest. Not measured here: an agent syncing with a real HA under load (aiohttp loaded).
- **Federation at 1,000 entities** (`federation-ha`, investigated 2026-12-03 with `py-spy record` of the
  agent and of main's HA, and timings added to the exporter for the investigation): the exporter is not
  what bounds the time to main. Its start costs about 0.1 s of CPU: the registries and states are read once
  (0.01-0.04 s each), the 1,000 configs and states built and handed to paho with `send` (no awaited
  publish each: 0.17-0.33 s), then `online` is published and acknowledged behind them (paho's window of
  128 unacknowledged publishes: 16 round trips through the broker, 0.1 s on an idle machine, 1.6-2.3 s
  at load 11). The agent's whole CPU from process start to main holding everything is about 1 s, most
  of it imports. The time goes (1) to the election: a node alone observes one lease (3 s) before it may
  claim, so primary comes 3.7 s after the process starts at load 2-3; (2) to main's HA creating
  the entities: about 2.5-3 s of main's CPU per 1,000 (entity registry, four subscriptions per entity,
  templates), which on a shared two-core machine stretches to 6-11 s of wall time. Trimming the config
  (no attributes topic, no per-entity availability) changed main's CPU by less than the run-to-run
  noise (1.7-2.3 s per 1,000). A hub whose own HA reads the discovery prefix doubles that work on the
  hub: keep the hub HA's MQTT discovery off.
- **amqtt** forwards more slowly than Mosquitto, and in the plain loop's 1,000 msg/s phase (run right
  after the 100 msg/s phase on the same broker) the first ~500 messages arrive 2.6-5 s late, then
  latency is back under a few ms. During that stall the broker process is idle (`py-spy dump`: waiting
  in `select`), so amqtt is waiting on something (a timer or a delivery window), not working; a warm-up
  message sent just before the phase comes back in ~30 ms, and a fresh amqtt shows no stall. Not
  investigated further: amqtt is the development broker. That stall is what its p95 shows.
"""
