"""End-to-end tests: the official openai SDK and raw HTTP against tokengo."""
