"""Simulated community: devices and service terminals that speak the contract over MQTT."""
