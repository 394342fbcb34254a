"""Helpers every stage shares: settings checks and the one-line error exit, safe file writing, the
bundled MiniLM, progress bars, CPU facts. Imports nothing else of the package."""
