"""attnhub's built-in backends, each a plugin registered exactly like a third-party one.

This folder is installed as the ``attnhub.backends`` package (see pyproject.toml).
"""
