"""Prefect flows: ``edit_collection`` (a whole collection) and ``edit_scene`` (one scene, for events)."""
