"""See the module map in docs/architecture.md."""
