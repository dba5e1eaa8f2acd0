"""The library every Tropical service uses: protocol, bus, store, settings and more."""
