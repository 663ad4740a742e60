"""MQTT connection code, in one place (floor 1: imports only settings, instruments, models, clock).

`link` keeps a client's connection state and the words for why it is down (`BrokerLink`), `tls`
builds the TLS context from broker settings, `diagnosis` finds out why a broker is unreachable,
and `mqtt311` sets up paho, which the MQTT 3.1.1 device driver (drivers/mqtt.py) and the district
uplink (gateway/uplink/sink.py) use. Nothing here imports paho but `mqtt311`, so a gateway on the
MQTT 5 driver never loads it (memory on a small box, issue 15).
"""
