"""hasync: high availability for Home Assistant over MQTT."""

__version__ = "0.1.0"
