"""`python -m services.profiler [options]`: the profiler service, as `tropical serve profiler`."""

from services.profiler.service import main

main()
