"""hasync's benchmark harness: ``python -m bench`` (or ``./scripts/bench``) runs scenarios on this
machine and writes BENCHMARKS.md.

Modules: ``stats`` (distributions), ``report`` (rows, targets, the Markdown report, the machine),
``registry`` (the scenarios by name: add one with ``@scenario``), ``cluster`` (agents with
production timings, waiting for a stable cluster, overlap of tenures), and one module per group of
scenarios: ``failover``, ``ha_failover``, ``footprint`` (idle and under sync load), ``mqttloop`` (the plain
aiomqtt ceiling), ``syncbench`` (agent-to-agent sync) and ``syncha`` (sync through real Home Assistant).
Brokers, agents and Home Assistant are the tests' own controllers, from the ``harness`` package.
"""
