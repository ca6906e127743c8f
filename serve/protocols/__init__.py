"""One adapter per API style: each parses its wire request into an `Intent` (serve/translation),
renders the engine's events in its wire format, and renders `ApiError` in its error shape
through its router's exception handler. Nothing else lives here."""
