"""Built-in dataset recipes: one file each, registered with ``@register_dataset``."""
