"""The campaign loop: config, durable store, surrogate, acquisition, CLI."""
