"""The deployable services; each is a thin shell over the `tropical` package."""
