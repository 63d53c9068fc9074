"""The Home Assistant edge: the only package that talks to Home Assistant.

``websocket`` opens and authenticates a connection (the seam the in-process tests replace);
``link`` supervises it and checks HA's health, with the MQTT echo of ``probe``; ``backend`` is entity
sync's view of HA's states; ``automations`` is managed mode; ``discovery`` builds the MQTT discovery
messages that show each node in HA. ``errors`` holds the exception tree.
"""
