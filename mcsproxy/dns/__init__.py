"""The clusterset.local DNS responder: wire format, zone index, responder, listeners."""
