"""The decode worker service."""
