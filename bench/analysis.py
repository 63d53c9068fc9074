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
- **amqtt** forwards more slowly than Mosquitto, and in the plain loop's 1,000 msg/s phase (run right
  after the 100 msg/s phase on the same broker) the first ~500 messages arrive 2.6-5 s late, then
  latency is back under a few ms. During that stall the broker process is idle (`py-spy dump`: waiting
  in `select`), so amqtt is waiting on something (a timer or a delivery window), not working; a warm-up
  message sent just before the phase comes back in ~30 ms, and a fresh amqtt shows no stall. Not
  investigated further: amqtt is the development broker. That stall is what its p95 shows.
"""
