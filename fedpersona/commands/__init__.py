"""CLI command groups, one module per use (deployment, research); ``fedpersona.cli`` registers them."""
