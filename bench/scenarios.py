"""Imports every scenario module, which registers its scenarios in ``bench.registry.SCENARIOS``.
The order here is the order of the report."""

from . import failover, federation, footprint, ha_failover, home, mqttloop, soak, syncbench, syncha, viplifetime

__all__ = ["failover", "federation", "footprint", "ha_failover", "home", "mqttloop", "soak", "syncbench", "syncha",
           "viplifetime"]
