"""What makes the server safe on a network: tokens, the network policy, the word filter, rate limits and
the audit log. The server's gate (`server/gate.py`) applies them to every request."""
