"""The wire protocol, pure: framing, message schema, tensor records, the authenticated handshake."""
