"""UNet-NAS search, CLI, reports, export and training. Imports go one way: ``nas`` -> ``proxies`` ->
``search_spaces``."""

__version__ = "0.1.0"
