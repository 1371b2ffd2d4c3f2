"""ORBION conversation service: message history (event store, projection, cache), history API, replies."""
