"""`python -m services.gateway [options]`: the OpenAI-compatible gateway, as `tropical serve gateway`."""

from services.gateway.service import main

main()
