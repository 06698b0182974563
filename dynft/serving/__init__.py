"""The inference server: engine (micro-batching, hot swap), HTTP app, and server process."""
