"""Wafer-scale MoE simulator (after MoEntwine): platforms, mappings, collectives, time model.

Import what you need from the submodules (hardware, models, topology, mapping, traffic,
timemodel, simulate); this package file stays light because the CLI imports it.
"""
