"""`python -m meshserve ...` is the `meshserve` command."""

from meshserve.cli import main

main()
