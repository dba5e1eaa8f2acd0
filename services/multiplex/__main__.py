"""`python -m services.multiplex [options]`: a multiplex worker, as `tropical serve multiplex`."""

from services.multiplex.service import main

main()
