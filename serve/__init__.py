"""The tsjax server: an engine over the compiled steps, and one adapter per API style."""
