"""`python -m services.prefill [options]`: a prefill worker, as `tropical serve prefill`."""

from services.prefill.service import main

main()
