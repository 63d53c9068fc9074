"""What the tests and the benchmarks run hasync against, in one typed package (not part of hasync).

Real parts started on free ports: ``brokers`` (Mosquitto and the embedded amqtt as processes), ``agents``
(hasync agents as processes, their HTTP API and event logs), ``ha`` (a real Home Assistant). Fakes of the
seams, for the in-process tier: ``fakebroker`` (an MQTT broker model, used by that tier and by the
simulation), ``fakeha`` (Home Assistant's websocket API, replaying frames recorded from the real one) and
``vclock`` (an event loop on virtual time). ``sim`` is the election's discrete-event simulation,
``inprocess`` runs real ``Agent`` objects on the fakes, ``wait`` has the one ``free_port`` and polling helper.
"""
