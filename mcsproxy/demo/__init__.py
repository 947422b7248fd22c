"""`mcsproxy demo`: a complete local clusterset on loopback addresses, in one command."""
