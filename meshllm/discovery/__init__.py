"""Zero-configuration discovery: devices advertise `_meshllm._tcp.local.` over mDNS and browse for each other."""

from .records import SERVICE_TYPE, PeerRecord, RecordError, mesh_id

__all__ = ["SERVICE_TYPE", "PeerRecord", "RecordError", "mesh_id"]
