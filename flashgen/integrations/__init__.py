"""Adapters that let other libraries' models run flashgen attention (each imports its library lazily)."""
