"""`python -m services.decode [options]`: a decode worker, as `tropical serve decode`."""

from services.decode.service import main

main()
