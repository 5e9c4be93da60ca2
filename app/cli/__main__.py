"""`python -m app.cli`: the same as the `queue-worker` console script."""

from app.cli import main

main()
