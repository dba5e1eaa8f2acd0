"""`python -m services.router [options]`: the router service, as `tropical serve router`."""

from services.router.service import main

main()
