"""Hardware platforms as data: wafer-scale meshes (one or several wafers) and switched GPU systems.

All quantities are kept in SI units (bytes, bytes/s, seconds, FLOP/s); the YAML presets carry
unit-suffixed fields and are converted here once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from meshserve.errors import InputError
from meshserve.wafer.presets import Section, preset_names, read_preset


@dataclass(frozen=True)
class Die:
    """One compute die / GPU: roofline parameters and what it can put on the network.

    injection_bandwidth: bytes/s the die can inject into (and, the same, eject from) the network,
      each direction; 0 = what its links sum to (an assumption: a router port per link), which can
      never bind, so the topology builds no port links then.
    """

    peak_flops: float  # FLOP/s (BF16 dense)
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s
    injection_bandwidth: float = 0.0


@dataclass(frozen=True)
class Hardware:
    """A platform: kind "mesh" (wafers of rows x cols dies) or "switch" (GPUs behind switches).

    mesh: links between neighbouring dies (link_bandwidth per direction, hop_latency per link);
      with wafers > 1 every die also has an off-wafer port (wafer_link_*) to a switch joining
      the dies at the same (row, col) on all wafers.
    switch: devices_per_node GPUs share an NVLink switch (link_* per direction, per GPU); with
      several nodes, each GPU also has a NIC link (scale_out_*) to one scale-out switch.
    """

    name: str
    kind: str
    die: Die
    link_bandwidth: float
    hop_latency: float
    rows: int = 0
    cols: int = 0
    wafers: int = 1
    wafer_link_bandwidth: float = 0.0
    wafer_link_latency: float = 0.0
    devices: int = 0
    devices_per_node: int = 0
    scale_out_bandwidth: float = 0.0
    scale_out_latency: float = 0.0

    @property
    def num_devices(self) -> int:
        return self.rows * self.cols * self.wafers if self.kind == "mesh" else self.devices

    @property
    def devices_per_wafer(self) -> int:
        """Devices in one wafer (mesh) or one NVLink node (switch)."""
        return self.rows * self.cols if self.kind == "mesh" else self.devices_per_node

    def with_injection(self, bandwidth: float) -> Hardware:
        """The same platform with each die's injection/ejection port limited to ``bandwidth`` bytes/s."""
        if not bandwidth > 0:
            raise InputError("injection_bandwidth", f"must be > 0 bytes/s, got {bandwidth}")
        return dataclasses.replace(self, die=dataclasses.replace(self.die, injection_bandwidth=bandwidth))

    def with_mesh(self, rows: int, cols: int, wafers: int | None = None) -> Hardware:
        """The same dies and links on another mesh shape (for sweeps and tests)."""
        if self.kind != "mesh":
            raise InputError("hardware", f"{self.name} is not a mesh platform")
        if rows < 1 or cols < 1:
            raise InputError("mesh", f"rows and cols must be >= 1, got {rows}x{cols}")
        wafers = self.wafers if wafers is None else wafers
        if wafers < 1 or (wafers > 1 and self.wafer_link_bandwidth <= 0):
            raise InputError("wafers", f"{self.name} has no inter-wafer links; allowed: 1 (or use wsc-4x8x8)")
        name = f"wsc-{rows}x{cols}" if wafers == 1 else f"wsc-{wafers}x{rows}x{cols}"
        return dataclasses.replace(self, name=name, rows=rows, cols=cols, wafers=wafers)


def hardware_names() -> list[str]:
    """Names of the bundled hardware presets."""
    return preset_names("hardware")


def load_hardware(name: str) -> Hardware:
    """Load and validate a hardware preset by name (see hardware_names()) or YAML path."""
    data = read_preset("hardware", name, "hardware")
    return hardware_from_dict(data, str(data.get("name", name)))


def hardware_from_dict(data: dict, name: str) -> Hardware:
    """Build a Hardware from a preset mapping; every bad field raises InputError naming it."""
    top = Section(data, name)
    hw = _platform(top, name)
    top.reject_unknown()
    return hw


def _platform(top: Section, name: str) -> Hardware:
    kind = top.choice("kind", ("mesh", "switch"))
    d = top.section("die")
    die = Die(
        peak_flops=d.number("peak_tflops") * 1e12,
        hbm_bytes=d.number("hbm_capacity_gb") * 1e9,
        hbm_bandwidth=d.number("hbm_bandwidth_tb_per_s") * 1e12,
        injection_bandwidth=d.number("injection_bandwidth_gb_per_s") * 1e9
        if d.has("injection_bandwidth_gb_per_s")
        else 0.0,
    )
    if kind == "mesh":
        m = top.section("mesh")
        hw = Hardware(
            name=name,
            kind=kind,
            die=die,
            rows=m.integer("rows"),
            cols=m.integer("cols"),
            link_bandwidth=m.number("link_bandwidth_gb_per_s") * 1e9,
            hop_latency=m.number("hop_latency_ns", positive=False) * 1e-9,
        )
        if top.has("wafers"):
            w = top.section("wafers")
            hw = dataclasses.replace(
                hw,
                wafers=w.integer("count"),
                wafer_link_bandwidth=w.number("link_bandwidth_gb_per_s") * 1e9,
                wafer_link_latency=w.number("link_latency_ns", positive=False) * 1e-9,
            )
        return hw
    s = top.section("switch")
    devices, per_node = s.integer("devices"), s.integer("devices_per_node")
    if devices % per_node:
        raise InputError(
            f"{name}.switch.devices_per_node", f"must divide devices ({devices}), got {per_node}"
        )
    hw = Hardware(
        name=name,
        kind=kind,
        die=die,
        devices=devices,
        devices_per_node=per_node,
        link_bandwidth=s.number("link_bandwidth_gb_per_s") * 1e9,
        hop_latency=s.number("link_latency_ns", positive=False) * 1e-9,
    )
    if devices > per_node:
        o = top.section("scale_out")
        hw = dataclasses.replace(
            hw,
            scale_out_bandwidth=o.number("link_bandwidth_gb_per_s") * 1e9,
            scale_out_latency=o.number("link_latency_ns", positive=False) * 1e-9,
        )
    return hw
