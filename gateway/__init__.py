"""The front door: OpenAI-compatible HTTP API, NATS-native request API, and the router."""
